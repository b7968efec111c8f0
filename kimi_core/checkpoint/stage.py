"""The `convert_checkpoint` stage: one conversion, cached by the content of its inputs.

The cache key and the check whether `dst` already holds this conversion live in the torch-free
`kimi_core.checkpoint.cache` (see its docstring for the key); this module does the conversion.

The output is written to `.{dst}.partial` beside `dst`, verified (tensor count, dtypes and shapes
against the source, and a bitwise check of a few sampled tensors), then `.conversion.json` is
written into it atomically as its last file and the directory is renamed to `dst`. A re-run
with the same inputs finds the record and returns `cached=True` without work.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from kimi_core.atomic import write_text_atomic
from kimi_core.checkpoint import int4, torch_dist
from kimi_core.checkpoint.cache import (
    CONVERTER_VERSION,
    DEFAULT_FULL_HASH_MAX_BYTES,
    DEFAULT_GROUP_SIZE,
    RECORD_NAME,
    ConversionKey,
    ConversionResult,
    Mode,
    check_mode,
    conversion_key,
    lookup_conversion,
)
from kimi_core.checkpoint.safetensors_io import TensorReader, read_checkpoint_entries


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (dtype, shape and bytes)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def _sample(keys: list[str], sizes: dict[str, int], k: int = 4) -> list[str]:
    """Deterministic sample: first, last, largest and middle keys."""
    picks = [keys[0], keys[-1], max(keys, key=lambda key: sizes[key]), keys[len(keys) // 2]]
    return list(dict.fromkeys(picks))[:k]


def _verify_safetensors_pair(src: Path, out: Path, mode: str) -> int:
    """int4 <-> bf16 checks; returns the output tensor count."""
    src_e, out_e = read_checkpoint_entries(src), read_checkpoint_entries(out)
    checks: list[tuple[str, Callable[[], torch.Tensor]]]
    with TensorReader() as reader:

        def unpacked(p: str) -> torch.Tensor:
            return int4.unpack_int4(*(reader.read(src_e[f"{p}.{s}"]) for s in int4.PACKED_SUFFIXES))

        def packed_weight(p: str) -> torch.Tensor:
            return int4.pack_int4(reader.read(src_e[f"{p}.weight"]),
                                  src_e[f"{p}.weight"].shape[1] // out_e[f"{p}.weight_scale"].shape[1])["weight_packed"]

        if mode == "int4_to_bf16":
            packed = [k.removesuffix(".weight_packed") for k in src_e if k.endswith(".weight_packed")]
            expected = len(src_e) - 2 * len(packed)
            checks = [(f"{p}.weight", functools.partial(unpacked, p)) for p in packed[:2]]
        else:
            packed = [k.removesuffix(".weight_packed") for k in out_e if k.endswith(".weight_packed")]
            expected = len(src_e) + 2 * len(packed)
            checks = [(f"{p}.weight_packed", functools.partial(packed_weight, p)) for p in packed[:2]]
        plain = [k for k in src_e if k in out_e]
        checks += [(k, functools.partial(reader.read, src_e[k]))
                   for k in _sample(plain, {k: src_e[k].nbytes for k in plain})]
        if len(out_e) != expected:
            raise ValueError(f"verify {mode}: {len(out_e)} tensors written, expected {expected}")
        for key, expect in checks:
            if not _same(reader.read(out_e[key]), expect()):
                raise ValueError(f"verify {mode}: tensor {key} differs from the source")
    return len(out_e)


def _verify_torch_dist(src: Path, out: Path, mode: str) -> int:
    """HF <-> torch_dist checks; returns the number of HF tensors."""
    hf_dir, td_dir = (src, out) if mode == "hf_to_torch_dist" else (out, src)
    entries = read_checkpoint_entries(hf_dir)
    with torch_dist.process_group(rank=0, world_size=1) if not dist.is_initialized() else contextlib.nullcontext():
        release, _, placements = torch_dist.read_torch_dist(td_dir)
        for p in placements:
            e = entries.get(p.spec.hf_key)
            if e is None or (e.dtype, e.shape) != (p.dtype, p.shape):
                raise ValueError(f"verify {mode}: {p.spec.hf_key} is {p.dtype}{p.shape} in torch_dist, "
                                 f"{e and (e.dtype, e.shape)} in HF")
        if len(placements) != len(entries):
            raise ValueError(f"verify {mode}: {len(placements)} tensors in torch_dist, {len(entries)} in HF")
        keys = [p.spec.hf_key for p in placements]
        picked = set(_sample(keys, {k: entries[k].nbytes for k in keys}))
        loaded = torch_dist.load_placements(release, [p for p in placements if p.spec.hf_key in picked])
    with TensorReader() as reader:
        for key, tensor in loaded.items():
            if not _same(tensor, reader.read(entries[key])):
                raise ValueError(f"verify {mode}: tensor {key} differs between HF and torch_dist")
    return len(entries)


def _run(mode: str, src: Path, tmp: Path, *, group_size: int, ignore: list[str] | None,
         rank: int, world_size: int) -> None:
    if mode == "hf_to_torch_dist":
        torch_dist.convert_hf_to_torch_dist(src, tmp, rank=rank, world_size=world_size)
    elif mode == "torch_dist_to_hf":
        torch_dist.convert_torch_dist_to_hf(src, tmp)
    elif mode == "int4_to_bf16":
        int4.dequantize_checkpoint_to_bf16(src, tmp)
    else:
        int4.quantize_checkpoint_int4(src, tmp, group_size=group_size, ignore=ignore)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def convert_stage(*, mode: Mode, src: str, dst: str, group_size: int = DEFAULT_GROUP_SIZE,
                  ignore: list[str] | None = None, rank: int = 0, world_size: int = 1,
                  full_hash_max_bytes: int = DEFAULT_FULL_HASH_MAX_BYTES,
                  key: ConversionKey | None = None) -> ConversionResult:
    """Convert `src` into `dst` unless `dst` already holds this conversion of these inputs.

    The early return is the check of `cache.cached_conversion` (same key, same record), done
    with its two halves so that the inputs are hashed once and their manifest goes into the
    new record; a caller that already computed the key for these arguments (`conversion_key`)
    passes it as `key` so the inputs are not hashed again. `world_size > 1` (only for `hf_to_torch_dist`) needs an initialized process
    group; every rank calls this, rank 0 hashes, verifies and publishes.
    """
    check_mode(mode)
    if world_size > 1 and (mode != "hf_to_torch_dist" or not dist.is_initialized()):
        raise ValueError("convert_checkpoint: world_size > 1 needs mode hf_to_torch_dist and a process group")
    start = time.monotonic()
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    if key is None:
        key = conversion_key(mode=mode, src=src_path, group_size=group_size, ignore=ignore,
                             full_hash_max_bytes=full_hash_max_bytes)
    cached = lookup_conversion(key, src=src_path, dst=dst_path, start=start)
    if cached is not None:
        return cached
    cache_key, options, inputs = key.cache_key, key.options, key.inputs
    tmp = dst_path.parent / f".{dst_path.name}.partial"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world_size)
    _run(mode, src_path, tmp, group_size=group_size, ignore=ignore, rank=rank, world_size=world_size)
    _barrier(world_size)
    num_tensors = 0
    if rank == 0:
        verify = _verify_torch_dist if "torch_dist" in mode else _verify_safetensors_pair
        num_tensors = verify(src_path, tmp, mode)
        result = ConversionResult(mode, str(src_path), str(dst_path), cache_key, False, num_tensors,
                                  time.monotonic() - start)
        record = {**asdict(result), "converter_version": CONVERTER_VERSION, "options": options, "inputs": inputs}
        write_text_atomic(tmp / RECORD_NAME, json.dumps(record, indent=2) + "\n")
        old = dst_path.parent / f".{dst_path.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if dst_path.exists():
            dst_path.rename(old)
        tmp.rename(dst_path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier(world_size)
    return ConversionResult(mode, str(src_path), str(dst_path), cache_key, False, num_tensors,
                            time.monotonic() - start)
