"""INT4 fake-quant, compressed-tensors packing, INT4 <-> BF16 checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kimi_core.checkpoint.int4 import (
    dequantize_checkpoint_to_bf16,
    fake_quantize_int4,
    pack_int4,
    quantize_checkpoint_int4,
    unpack_int4,
)
from tests.checkpoint.helpers import bitwise_equal, load_dir


def _reference_pack(w: torch.Tensor, group_size: int) -> tuple[list[list[int]], list[list[float]]]:
    """Element by element, straight from the spec: scale per (row, group), q + 8, nibble j of word."""
    rows, cols = w.shape
    scales = [[max(max(abs(float(w[r, c])) for c in range(g, g + group_size)) / 7, 1e-5)
               for g in range(0, cols, group_size)] for r in range(rows)]
    scales_t = torch.tensor(scales, dtype=torch.float32).to(w.dtype).float()  # stored dtype
    words = []
    for r in range(rows):
        row = []
        for word in range(cols // 8):
            value = 0
            for j in range(8):
                c = word * 8 + j
                q = max(-7, min(7, round(float(w[r, c].float()) / float(scales_t[r, c // group_size]))))
                value |= (q + 8) << (4 * j)
            row.append(value - (1 << 32) if value >= 1 << 31 else value)
        words.append(row)
    return words, scales_t.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_matches_elementwise_reference(dtype: torch.dtype) -> None:
    w = (torch.randn(3, 64, generator=torch.Generator().manual_seed(1)) * 0.1).to(dtype)
    w[1, :32] = 0.0  # an all-zero group takes the 1e-5 floor
    packed = pack_int4(w, group_size=32)
    words, scales = _reference_pack(w, 32)
    assert packed["weight_packed"].dtype == torch.int32 and packed["weight_packed"].tolist() == words
    assert packed["weight_scale"].dtype == dtype and packed["weight_scale"].float().tolist() == scales
    assert packed["weight_shape"].tolist() == [3, 64] and packed["weight_shape"].dtype == torch.int64


def test_hand_worked_group() -> None:
    # group of 8 (group_size 8): max|w| = 7 -> scale 1, q = w; nibbles q+8 = 1,9,10,...; word =
    # sum((q_j + 8) << 4j)
    w = torch.tensor([[-7.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    packed = pack_int4(w, group_size=8)
    expected = sum((int(v) + 8) << (4 * j) for j, v in enumerate(w[0].tolist()))
    assert packed["weight_packed"].item() == expected - (1 << 32)
    assert packed["weight_scale"].tolist() == [[1.0]]
    assert torch.equal(unpack_int4(**packed), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpack_of_pack_equals_fake_quantize(dtype: torch.dtype) -> None:
    w = (torch.randn(16, 128, generator=torch.Generator().manual_seed(2)) * 0.02).to(dtype)
    assert bitwise_equal(unpack_int4(**pack_int4(w)), fake_quantize_int4(w))


def test_fake_quantize_values_and_straight_through_gradient() -> None:
    w = torch.tensor([[0.7, -0.35, 0.1, 0.0] * 8], requires_grad=True)  # max 0.7 -> scale 0.1
    out = fake_quantize_int4(w)
    expected = torch.tensor([[0.7, -0.4, 0.1, 0.0] * 8])  # -3.5 rounds half to even -> -4
    assert torch.allclose(out, expected)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_bad_group_size_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple of group_size"):
        pack_int4(torch.zeros(2, 48), group_size=32)


def test_checkpoint_int4_round_trip(tiny_hf, tmp_path: Path) -> None:
    hf_dir, tensors = tiny_hf
    q_dir = quantize_checkpoint_int4(hf_dir, tmp_path / "int4", group_size=32)
    quantized = load_dir(q_dir)
    config = json.loads((q_dir / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["format"]) == ("compressed-tensors", "pack-quantized")
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["symmetric"], weights["strategy"],
            weights["group_size"]) == (4, "int", True, "group", 32)
    assert "lm_head" in qc["ignore"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    expert = "model.layers.2.mlp.experts.3.down_proj"
    assert f"{expert}.weight" not in quantized and quantized[f"{expert}.weight_packed"].shape == (64, 4)
    for kept in ("model.layers.2.mlp.shared_experts.up_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.1.self_attn.kv_b_proj.weight", "model.layers.2.mlp.gate.weight", "lm_head.weight"):
        assert bitwise_equal(quantized[kept], tensors[kept])
    n_experts = sum(1 for k in tensors if ".experts." in k)
    assert len(quantized) == len(tensors) + 2 * n_experts

    bf16_dir = dequantize_checkpoint_to_bf16(q_dir, tmp_path / "bf16")
    restored = load_dir(bf16_dir)
    assert restored.keys() == tensors.keys()
    assert "quantization_config" not in json.loads((bf16_dir / "config.json").read_text())
    for key, tensor in tensors.items():
        expected = fake_quantize_int4(tensor) if ".experts." in key else tensor
        assert bitwise_equal(restored[key], expected), key


def test_ignore_pattern_keeps_a_layer_unquantized(tiny_hf, tmp_path: Path) -> None:
    hf_dir, tensors = tiny_hf
    quantized = load_dir(quantize_checkpoint_int4(hf_dir, tmp_path / "int4", ignore=[r"re:model\.layers\.1\..*"]))
    assert bitwise_equal(quantized["model.layers.1.mlp.experts.0.up_proj.weight"],
                         tensors["model.layers.1.mlp.experts.0.up_proj.weight"])
    assert "model.layers.2.mlp.experts.0.up_proj.weight_packed" in quantized
