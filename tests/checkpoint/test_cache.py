"""The torch-free cache check of the `convert_checkpoint` stage (`kimi_core.checkpoint.cache`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_core.checkpoint.cache import RECORD_NAME, cached_conversion
from kimi_core.checkpoint.stage import convert_stage

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_cache_module_imports_no_torch() -> None:
    code = ("import sys, kimi_core.checkpoint.cache\n"
            "heavy = sorted(m for m in ('torch', 'megatron', 'numpy', 'safetensors') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"importing kimi_core.checkpoint.cache imported {out.stdout.strip()}"


def test_cached_conversion_is_decided_by_content(tiny_hf, tmp_path: Path) -> None:
    hf_dir, _ = tiny_hf
    dst = tmp_path / "int4"
    assert cached_conversion(mode="bf16_to_int4", src=hf_dir, dst=dst) is None  # nothing converted yet
    done = convert_stage(mode="bf16_to_int4", src=str(hf_dir), dst=str(dst))  # default group_size

    hit = cached_conversion(mode="bf16_to_int4", src=str(hf_dir), dst=str(dst))
    assert hit is not None and hit.cached
    assert (hit.cache_key, hit.num_tensors, hit.src, hit.dst) == (done.cache_key, done.num_tensors, done.src, done.dst)
    assert cached_conversion(mode="bf16_to_int4", src=hf_dir, dst=dst, group_size=16) is None  # other options

    shard = sorted(hf_dir.glob("*.safetensors"))[1]
    before = shard.stat()
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a byte inside the tensor data: same size, other content
    with open(shard, "r+b") as f:  # in place, same inode
        f.write(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = shard.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert cached_conversion(mode="bf16_to_int4", src=hf_dir, dst=dst) is None

    data[len(data) // 2] ^= 0xFF  # the original bytes again: the record matches again
    shard.write_bytes(bytes(data))
    again = cached_conversion(mode="bf16_to_int4", src=hf_dir, dst=dst)
    assert again is not None and again.cache_key == done.cache_key


def test_cached_conversion_needs_a_complete_record(tiny_hf, tmp_path: Path) -> None:
    hf_dir, _ = tiny_hf
    dst = tmp_path / "int4"
    done = convert_stage(mode="bf16_to_int4", src=str(hf_dir), dst=str(dst))
    record_path = dst / RECORD_NAME
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({k: v for k, v in record.items() if k != "num_tensors"}))
    assert cached_conversion(mode="bf16_to_int4", src=hf_dir, dst=dst) is None
    record_path.write_text(json.dumps(record)[:-10])  # truncated
    assert cached_conversion(mode="bf16_to_int4", src=hf_dir, dst=dst) is None
    record_path.unlink()
    assert cached_conversion(mode="bf16_to_int4", src=hf_dir, dst=dst) is None
    redone = convert_stage(mode="bf16_to_int4", src=str(hf_dir), dst=str(dst))  # a broken record: convert again
    assert not redone.cached and redone.cache_key == done.cache_key
    assert cached_conversion(mode="bf16_to_int4", src=hf_dir, dst=dst) is not None


def test_cached_conversion_rejects_unknown_mode_and_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown mode 'fp8'"):
        cached_conversion(mode="fp8", src=tmp_path, dst=tmp_path / "x")
    with pytest.raises(ValueError, match="does not exist"):
        cached_conversion(mode="int4_to_bf16", src=tmp_path / "nope", dst=tmp_path / "x")
