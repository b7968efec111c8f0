"""The stats file that marks a prepared data set as done (the cache record)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kimi_core.atomic import open_atomic

_CHUNK = 1 << 20


def write_stats(path: Path, stats: dict[str, Any]) -> None:
    """Write `stats` as indented JSON, atomically."""
    with open_atomic(path) as handle:
        handle.write(json.dumps(stats, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")


def file_sha256(path: Path) -> str:
    """sha256 hex of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_cached_stats(stats_path: Path, output_path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The stats of a finished earlier preparation, or None when it cannot be reused.

    Reusable means: the stats file parses, every `identity` entry (source sha256, prep version,
    options) is equal, and the output file exists with the recorded sha256.
    """
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(stats, dict) or any(stats.get(key) != value for key, value in identity.items()):
        return None
    if not output_path.is_file() or file_sha256(output_path) != stats.get("output_sha256"):
        return None
    return stats
