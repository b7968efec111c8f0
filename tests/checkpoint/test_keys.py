"""HF DeepSeek-V3 names -> Megatron torch_dist names (checked against a hand-written table)."""

from __future__ import annotations

import pytest
import torch

from kimi_core.checkpoint.keys import ModelLayout, place_from_megatron, place_hf_tensors
from kimi_core.checkpoint.synthetic import hf_tensor_shapes, tiny_config


def _by_hf(config: dict) -> dict:
    layout = ModelLayout.from_hf_config(config)
    return {p.spec.hf_key: p for p in place_hf_tensors(layout, hf_tensor_shapes(config))}


def test_names_of_every_kind_of_tensor() -> None:
    placements = _by_hf(tiny_config())
    expected = {  # hf key -> (megatron global key, module param name, global offset)
        "model.embed_tokens.weight": ("embedding.word_embeddings.weight", (0, 0)),
        "lm_head.weight": ("output_layer.weight", (0, 0)),
        "model.norm.weight": ("decoder.final_layernorm.weight", (0,)),
        "model.layers.0.input_layernorm.weight": ("decoder.layers.0.input_layernorm.weight", (0,)),
        "model.layers.1.self_attn.q_a_proj.weight": ("decoder.layers.1.self_attention.linear_q_down_proj.weight", (0, 0)),
        "model.layers.1.self_attn.q_a_layernorm.weight": ("decoder.layers.1.self_attention.linear_q_up_proj.layer_norm_weight", (0,)),
        "model.layers.1.self_attn.q_b_proj.weight": ("decoder.layers.1.self_attention.linear_q_up_proj.weight", (0, 0)),
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight": ("decoder.layers.1.self_attention.linear_kv_down_proj.weight", (0, 0)),
        "model.layers.1.self_attn.kv_a_layernorm.weight": ("decoder.layers.1.self_attention.linear_kv_up_proj.layer_norm_weight", (0,)),
        "model.layers.1.self_attn.kv_b_proj.weight": ("decoder.layers.1.self_attention.linear_kv_up_proj.weight", (0, 0)),
        "model.layers.1.self_attn.o_proj.weight": ("decoder.layers.1.self_attention.linear_proj.weight", (0, 0)),
        # dense layer 0: TE fuses the pre-MLP norm into linear_fc1; fc1 rows = [gate (96); up (96)]
        "model.layers.0.post_attention_layernorm.weight": ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", (0,)),
        "model.layers.0.mlp.gate_proj.weight": ("decoder.layers.0.mlp.linear_fc1.weight", (0, 0)),
        "model.layers.0.mlp.up_proj.weight": ("decoder.layers.0.mlp.linear_fc1.weight", (96, 0)),
        "model.layers.0.mlp.down_proj.weight": ("decoder.layers.0.mlp.linear_fc2.weight", (0, 0)),
        # MoE layer 2
        "model.layers.2.post_attention_layernorm.weight": ("decoder.layers.2.pre_mlp_layernorm.weight", (0,)),
        "model.layers.2.mlp.gate.weight": ("decoder.layers.2.mlp.router.weight", (0, 0)),
        "model.layers.2.mlp.gate.e_score_correction_bias": ("decoder.layers.2.mlp.router.expert_bias", (0,)),
        "model.layers.2.mlp.experts.3.gate_proj.weight": ("decoder.layers.2.mlp.experts.experts.linear_fc1.weight", (3, 0, 0)),
        "model.layers.2.mlp.experts.3.up_proj.weight": ("decoder.layers.2.mlp.experts.experts.linear_fc1.weight", (3, 32, 0)),
        "model.layers.2.mlp.experts.1.down_proj.weight": ("decoder.layers.2.mlp.experts.experts.linear_fc2.weight", (1, 0, 0)),
        "model.layers.2.mlp.shared_experts.up_proj.weight": ("decoder.layers.2.mlp.shared_experts.linear_fc1.weight", (32, 0)),
        "model.layers.2.mlp.shared_experts.down_proj.weight": ("decoder.layers.2.mlp.shared_experts.linear_fc2.weight", (0, 0)),
    }
    for hf_key, (mcore_key, offset) in expected.items():
        assert (placements[hf_key].spec.megatron_key, placements[hf_key].global_offset) == (mcore_key, offset), hf_key
    assert placements["model.layers.2.mlp.experts.3.up_proj.weight"].global_shape == (4, 64, 64)
    assert placements["model.layers.2.mlp.experts.1.down_proj.weight"].global_shape == (4, 64, 32)
    assert placements["model.layers.0.mlp.gate_proj.weight"].global_shape == (192, 64)
    assert placements["model.layers.2.mlp.experts.3.up_proj.weight"].spec.param_name == \
        "decoder.layers.2.mlp.experts.linear_fc1.weight3"


def test_without_q_lora_q_proj_maps_to_linear_q_proj() -> None:
    placements = _by_hf(tiny_config(q_lora_rank=None))
    assert placements["model.layers.1.self_attn.q_proj.weight"].spec.megatron_key == \
        "decoder.layers.1.self_attention.linear_q_proj.weight"
    assert not any("q_a_proj" in k for k in placements)


def test_missing_and_unexpected_keys_are_named() -> None:
    config = tiny_config()
    shapes = hf_tensor_shapes(config)
    del shapes["model.layers.2.mlp.experts.3.up_proj.weight"]
    shapes["model.layers.2.mlp.mystery.weight"] = (torch.bfloat16, (2, 2))
    with pytest.raises(ValueError, match=r"1 missing.*experts\.3\.up_proj.*1 unexpected.*mystery"):
        place_hf_tensors(ModelLayout.from_hf_config(config), shapes)


def test_gate_up_shape_mismatch_is_refused() -> None:
    config = tiny_config()
    shapes = hf_tensor_shapes(config)
    shapes["model.layers.0.mlp.up_proj.weight"] = (torch.bfloat16, (95, 64))
    with pytest.raises(ValueError, match="up_proj"):
        place_hf_tensors(ModelLayout.from_hf_config(config), shapes)


def test_megatron_shapes_invert_to_hf_shapes() -> None:
    config = tiny_config()
    layout = ModelLayout.from_hf_config(config)
    forward = place_hf_tensors(layout, hf_tensor_shapes(config))
    global_tensors = {p.spec.megatron_key: (p.dtype, p.global_shape) for p in forward}
    back = place_from_megatron(layout, global_tensors)
    assert [(p.spec.hf_key, p.shape, p.dtype) for p in back] == [(p.spec.hf_key, p.shape, p.dtype) for p in forward]
