"""HF safetensors checkpoint directories without torch: shard listing, headers, verification.

Layout (as `transformers` writes it): `config.json` plus either one `model.safetensors`, or
shards `model-00001-of-0000N.safetensors` ... with `model.safetensors.index.json` =
`{"metadata": {"total_size": bytes}, "weight_map": {key: file}}`. A safetensors file is an
8-byte little-endian header length, a JSON header, then the raw tensor bytes.

This is the one reader of that layout: `kimi_core.checkpoint.safetensors_io` (streaming tensor
reads) and `kimi_core.model.io` build on `list_shards` and `read_safetensors_header`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointInvalid(ValueError):
    """An HF checkpoint directory that is missing files or has torn shards."""


@dataclass(frozen=True)
class HFCheckpointInfo:
    path: str
    num_tensors: int
    num_shards: int
    total_bytes: int


@dataclass(frozen=True)
class ShardListing:
    """The safetensors files of a checkpoint directory and the index that names them."""

    root: Path
    index: Path | None
    """The index file; None for a single `model.safetensors`."""
    weight_map: dict[str, str]
    """`{tensor key: file name}` from the index; empty without one."""
    files: list[str]
    """File names (sorted), every one present."""


def list_shards(root: str | Path) -> ShardListing:
    """The safetensors files of `root`: those the index names, else `model.safetensors`.

    Raises `CheckpointInvalid` when neither exists or the index names a missing file.
    """
    root = Path(root)
    index = root / INDEX_NAME
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        listing = ShardListing(root, index, weight_map, sorted(set(weight_map.values())))
    elif (root / SINGLE_NAME).is_file():
        listing = ShardListing(root, None, {}, [SINGLE_NAME])
    else:
        raise CheckpointInvalid(f"{root}: no {SINGLE_NAME} and no {INDEX_NAME}")
    for name in listing.files:
        if not (root / name).is_file():
            raise CheckpointInvalid(f"{index}: shard {name!r} named in the index is missing")
    return listing


def read_safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """`(header, data_start)` of a safetensors file: its JSON header and where tensor bytes begin.

    Raises `CheckpointInvalid` for a file shorter than its header or its tensors (torn write) or
    an unreadable header.
    """
    size = file.stat().st_size
    with file.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointInvalid(f"{file}: truncated safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise CheckpointInvalid(f"{file}: header length {length} exceeds the file size {size}")
        try:
            header = json.loads(fh.read(length))
        except json.JSONDecodeError as err:
            raise CheckpointInvalid(f"{file}: unreadable safetensors header: {err}") from err
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise CheckpointInvalid(f"{file}: expected {8 + length + end} bytes from its header, found {size} (torn write?)")
    return header, 8 + length


def verify_hf_checkpoint(path: str | Path) -> HFCheckpointInfo:
    """Check `config.json`, the index (if sharded) and every shard's header; raise `CheckpointInvalid`."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointInvalid(f"HF checkpoint directory not found: {root}")
    if not (root / "config.json").is_file():
        raise CheckpointInvalid(f"{root}: config.json is missing")
    json.loads((root / "config.json").read_text())
    listing = list_shards(root)
    names: set[str] = set()
    total = 0
    for shard in listing.files:
        header, _ = read_safetensors_header(root / shard)
        names |= {k for k in header if k != "__metadata__"}
        total += (root / shard).stat().st_size
    missing = sorted(set(listing.weight_map) - names)
    if missing:
        raise CheckpointInvalid(f"{root}: tensors in the index but in no shard: {missing[:5]}")
    return HFCheckpointInfo(path=str(root), num_tensors=len(names), num_shards=len(listing.files), total_bytes=total)
