"""The cached `convert_checkpoint` stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kimi_core.checkpoint.cache import CONVERTER_VERSION, file_digest
from kimi_core.checkpoint.int4 import fake_quantize_int4
from kimi_core.checkpoint.stage import convert_stage
from tests.checkpoint.helpers import bitwise_equal, load_dir


def test_hf_to_torch_dist_is_cached_by_content(tiny_hf, tmp_path: Path) -> None:
    hf_dir, tensors = tiny_hf
    dst = tmp_path / "td"
    first = convert_stage(mode="hf_to_torch_dist", src=str(hf_dir), dst=str(dst))
    assert not first.cached and first.num_tensors == len(tensors)
    record = json.loads((dst / ".conversion.json").read_text())
    assert record["cache_key"] == first.cache_key and record["converter_version"] == CONVERTER_VERSION
    assert (dst / "release" / ".metadata").is_file()
    assert not any(p.name.startswith(".td.") for p in tmp_path.iterdir())  # temp dirs renamed away

    marker = (dst / "release" / ".metadata").stat().st_mtime_ns
    again = convert_stage(mode="hf_to_torch_dist", src=str(hf_dir), dst=str(dst))
    assert again.cached and again.cache_key == first.cache_key
    assert (dst / "release" / ".metadata").stat().st_mtime_ns == marker

    (hf_dir / "tokenizer_config.json").write_text('{"model_max_length": 256}')  # an input changed
    changed = convert_stage(mode="hf_to_torch_dist", src=str(hf_dir), dst=str(dst))
    assert not changed.cached and changed.cache_key != first.cache_key

    back = convert_stage(mode="torch_dist_to_hf", src=str(dst), dst=str(tmp_path / "hf2"))
    restored = load_dir(Path(back.dst))
    assert all(bitwise_equal(restored[k], tensors[k]) for k in tensors)


def test_int4_modes_round_trip(tiny_hf, tmp_path: Path) -> None:
    hf_dir, tensors = tiny_hf
    q = convert_stage(mode="bf16_to_int4", src=str(hf_dir), dst=str(tmp_path / "int4"), group_size=32)
    b = convert_stage(mode="int4_to_bf16", src=q.dst, dst=str(tmp_path / "bf16"))
    assert b.num_tensors == len(tensors)
    restored = load_dir(Path(b.dst))
    key = "model.layers.1.mlp.experts.2.gate_proj.weight"
    assert bitwise_equal(restored[key], fake_quantize_int4(tensors[key]))
    assert convert_stage(mode="int4_to_bf16", src=q.dst, dst=str(tmp_path / "bf16")).cached
    # a different option is a different conversion
    assert not convert_stage(mode="bf16_to_int4", src=str(hf_dir), dst=str(tmp_path / "int4"), group_size=16).cached


def test_unknown_mode_and_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown mode 'fp8'.*hf_to_torch_dist"):
        convert_stage(mode="fp8", src=str(tmp_path), dst=str(tmp_path / "x"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not exist"):
        convert_stage(mode="int4_to_bf16", src=str(tmp_path / "nope"), dst=str(tmp_path / "x"))


def test_failed_conversion_leaves_earlier_output(tiny_hf, tmp_path: Path) -> None:
    hf_dir, _ = tiny_hf
    dst = tmp_path / "td"
    convert_stage(mode="hf_to_torch_dist", src=str(hf_dir), dst=str(dst))
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    with pytest.raises(ValueError, match="missing key"):
        convert_stage(mode="hf_to_torch_dist", src=str(hf_dir), dst=str(dst))
    assert (dst / ".conversion.json").is_file() and (dst / "release" / ".metadata").is_file()


def test_sampled_digest_sees_a_changed_block(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    data = bytearray(torch.randint(0, 255, (5 << 20,), dtype=torch.uint8).numpy().tobytes())
    path.write_bytes(bytes(data))
    full, sampled = file_digest(path, full_hash_max_bytes=1 << 30), file_digest(path, full_hash_max_bytes=1 << 20)
    assert full.startswith("sha256:") and sampled.startswith("sampled-sha256:")
    data[-1] ^= 0xFF  # the last block is always sampled
    path.write_bytes(bytes(data))
    assert file_digest(path, full_hash_max_bytes=1 << 20) != sampled
