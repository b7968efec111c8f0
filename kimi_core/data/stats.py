"""Atomic file writes and the stats file that marks a prepared data set as done (the cache record)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_write_bytes(path: Path, *, before_replace: Callable[[], None] | None = None) -> Iterator[IO[bytes]]:
    """Yield a binary temp file beside `path`; on normal exit fsync it and rename it to `path`.

    `before_replace` runs just before the rename (e.g. to drop a stale "done" marker). On an
    exception the temp file is removed and `path` is left as it was.
    """
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_stats(path: Path, stats: dict[str, Any]) -> None:
    """Write `stats` as indented JSON, atomically."""
    with atomic_write_bytes(path) as handle:
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
