"""The cache check of the `convert_checkpoint` stage, without torch or megatron.

A conversion is cached by the content of its inputs. Cache key = sha256 over the JSON of
(mode, CONVERTER_VERSION, options, every input file's relative path, size and digest). A file
up to `full_hash_max_bytes` is hashed whole (streaming sha256); a larger one by its size plus
`SAMPLE_BLOCKS` blocks of 1 MiB at evenly spaced offsets (first and last included): reading a
1 TB checkpoint fully on every run would cost more than the conversion, and safetensors shards
of a new model differ in their headers and sampled bytes. Sizes and mtimes alone decide
nothing: a file rewritten in place with other bytes of the same size and the same mtime is a
different input.

The output directory holds `RECORD_NAME` (`.conversion.json`), written atomically as its last
file; a directory without a readable record is not a finished conversion. This module imports
only the standard library, so a process that only needs to learn that the output is already
there (`cached_conversion`) starts without paying for torch and megatron; the conversion
itself lives in `kimi_core.checkpoint.stage`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CONVERTER_VERSION = "1"
RECORD_NAME = ".conversion.json"
SAMPLE_BLOCKS = 16
SAMPLE_BLOCK_BYTES = 1 << 20
DEFAULT_GROUP_SIZE = 32
DEFAULT_FULL_HASH_MAX_BYTES = 256 << 20
Mode = Literal["hf_to_torch_dist", "torch_dist_to_hf", "int4_to_bf16", "bf16_to_int4"]
MODES = ("hf_to_torch_dist", "torch_dist_to_hf", "int4_to_bf16", "bf16_to_int4")


@dataclass(frozen=True)
class ConversionResult:
    """What the stage did: where, under which cache key, whether it reused an earlier output."""

    mode: str
    src: str
    dst: str
    cache_key: str
    cached: bool
    num_tensors: int
    seconds: float


@dataclass(frozen=True)
class ConversionKey:
    """The cache key of one conversion of the current inputs, with what went into it.

    `options` and `inputs` are stored in the conversion record beside `cache_key`.
    """

    mode: str
    cache_key: str
    options: dict[str, object]
    inputs: list[dict[str, object]]


def check_mode(mode: str) -> None:
    """Raise `ValueError` naming the valid modes unless `mode` is one of `MODES`."""
    if mode not in MODES:
        raise ValueError(f"convert_checkpoint: unknown mode {mode!r}; valid: {', '.join(MODES)}")


def file_digest(path: Path, *, full_hash_max_bytes: int) -> str:
    """`sha256:<hex>` of the whole file, or `sampled-sha256:<hex>` of size + sampled blocks."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= full_hash_max_bytes:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
            return f"sha256:{digest.hexdigest()}"
        digest.update(str(size).encode())
        last = max(size - SAMPLE_BLOCK_BYTES, 0)
        for i in range(SAMPLE_BLOCKS):
            f.seek(last * i // (SAMPLE_BLOCKS - 1))
            digest.update(f.read(SAMPLE_BLOCK_BYTES))
    return f"sampled-sha256:{digest.hexdigest()}"


def input_manifest(src: Path, *, full_hash_max_bytes: int) -> list[dict[str, object]]:
    """`[{path, size, digest}]` of every file under `src` (sorted; the stage record excluded).

    Raises `ValueError` when `src` does not exist.
    """
    if not src.exists():
        raise ValueError(f"convert_checkpoint: source {src} does not exist")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != RECORD_NAME)
    return [{"path": str(p.relative_to(src)), "size": p.stat().st_size,
             "digest": file_digest(p, full_hash_max_bytes=full_hash_max_bytes)} for p in files]


def conversion_options(mode: str, *, group_size: int = DEFAULT_GROUP_SIZE,
                       ignore: list[str] | None = None) -> dict[str, object]:
    """The options that are part of the cache key: those of `bf16_to_int4`, none for other modes."""
    return {"group_size": group_size, "ignore": ignore} if mode == "bf16_to_int4" else {}


def cache_key(mode: str, options: dict[str, object], inputs: list[dict[str, object]]) -> str:
    """sha256 hex of the JSON (sorted keys) of `[mode, CONVERTER_VERSION, options, inputs]`."""
    key_src = json.dumps([mode, CONVERTER_VERSION, options, inputs], sort_keys=True).encode()
    return hashlib.sha256(key_src).hexdigest()


def conversion_key(*, mode: str, src: Path, group_size: int = DEFAULT_GROUP_SIZE,
                   ignore: list[str] | None = None,
                   full_hash_max_bytes: int = DEFAULT_FULL_HASH_MAX_BYTES) -> ConversionKey:
    """Hash the files under `src` now and return the cache key of converting them with `mode`.

    Raises `ValueError` for an unknown mode or a missing `src`.
    """
    check_mode(mode)
    options = conversion_options(mode, group_size=group_size, ignore=ignore)
    inputs = input_manifest(src, full_hash_max_bytes=full_hash_max_bytes)
    return ConversionKey(mode, cache_key(mode, options, inputs), options, inputs)


def lookup_conversion(key: ConversionKey, *, src: Path, dst: Path, start: float) -> ConversionResult | None:
    """The cached result if `dst` holds a finished conversion recorded under `key.cache_key`, else None.

    A missing, unreadable or incomplete record (no `cache_key` or `num_tensors`) counts as no
    conversion. `start` is the `time.monotonic()` the returned `seconds` are measured from.
    """
    try:
        record = json.loads((dst / RECORD_NAME).read_text())
        if not isinstance(record, dict) or record.get("cache_key") != key.cache_key:
            return None
        num_tensors = int(record["num_tensors"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ConversionResult(key.mode, str(src), str(dst), key.cache_key, True, num_tensors,
                            time.monotonic() - start)


def cached_conversion(*, mode: str, src: str | os.PathLike[str], dst: str | os.PathLike[str],
                      group_size: int = DEFAULT_GROUP_SIZE, ignore: list[str] | None = None,
                      full_hash_max_bytes: int = DEFAULT_FULL_HASH_MAX_BYTES) -> ConversionResult | None:
    """What `convert_stage` with these arguments would return without converting, or None.

    Returns a `ConversionResult` with `cached=True` when `dst` holds a finished conversion whose
    recorded cache key equals the key of the files under `src` as they are now (content, not
    size or mtime, decides), else None: then `convert_stage` has work to do. The options mean
    what they mean to `convert_stage` and default the same. Paths are resolved; `src` is hashed
    (the cost of the check). Raises `ValueError` for an unknown mode or a missing `src`.
    """
    start = time.monotonic()
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    key = conversion_key(mode=mode, src=src_path, group_size=group_size, ignore=ignore,
                         full_hash_max_bytes=full_hash_max_bytes)
    return lookup_conversion(key, src=src_path, dst=dst_path, start=start)
