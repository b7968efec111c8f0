"""Verify an HF safetensors checkpoint directory without loading its tensors."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path


class CheckpointInvalid(ValueError):
    """An HF checkpoint directory that is missing files or has torn shards."""


@dataclass(frozen=True)
class HFCheckpointInfo:
    path: str
    num_tensors: int
    num_shards: int
    total_bytes: int


def read_safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON)."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointInvalid(f"{file}: truncated safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise CheckpointInvalid(f"{file}: header length {length} exceeds the file size {size}")
        header = json.loads(fh.read(length))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise CheckpointInvalid(f"{file}: expected {8 + length + end} bytes from its header, found {size} (torn write?)")
    return header


def verify_hf_checkpoint(path: str | Path) -> HFCheckpointInfo:
    """Check `config.json`, the index (if sharded) and every shard's header; raise `CheckpointInvalid`."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointInvalid(f"HF checkpoint directory not found: {root}")
    if not (root / "config.json").is_file():
        raise CheckpointInvalid(f"{root}: config.json is missing")
    json.loads((root / "config.json").read_text())
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    elif (root / "model.safetensors").is_file():
        weight_map, shards = {}, ["model.safetensors"]
    else:
        raise CheckpointInvalid(f"{root}: neither model.safetensors nor model.safetensors.index.json exists")
    names: set[str] = set()
    total = 0
    for shard in shards:
        file = root / shard
        if not file.is_file():
            raise CheckpointInvalid(f"{root}: shard {shard} listed in the index is missing")
        header = read_safetensors_header(file)
        names |= {k for k in header if k != "__metadata__"}
        total += file.stat().st_size
    missing = sorted(set(weight_map) - names)
    if missing:
        raise CheckpointInvalid(f"{root}: tensors in the index but in no shard: {missing[:5]}")
    return HFCheckpointInfo(path=str(root), num_tensors=len(names), num_shards=len(shards), total_bytes=total)
