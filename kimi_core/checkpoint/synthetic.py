"""Synthetic DeepSeek-V3-shaped HF checkpoints (random weights, real key names and shapes).

Used by tests and the conversion benchmark; written shard by shard, so a multi-GB checkpoint is
built with about one tensor in memory. Key names are spelled out here in HF terms, independently
of `keys.py`, so tests of the key mapping check one against the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kimi_core.checkpoint.safetensors_io import write_index, write_streaming

TensorShapes = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def tiny_config(**overrides: object) -> dict[str, object]:
    """A DeepSeek-V3 `config.json` at toy sizes: layer 0 dense, the rest MoE (group-32 friendly)."""
    config: dict[str, object] = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 4,
        "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
        "topk_method": "noaux_tc", "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "rms_norm_eps": 1e-6, "routed_scaling_factor": 2.827,
        "scoring_func": "sigmoid", "norm_topk_prob": True, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "num_nextn_predict_layers": 0,
    }
    config.update(overrides)
    return config


def _mlp(prefix: str, hidden: int, width: int, dtype: torch.dtype) -> TensorShapes:
    return {f"{prefix}.gate_proj.weight": (dtype, (width, hidden)),
            f"{prefix}.up_proj.weight": (dtype, (width, hidden)),
            f"{prefix}.down_proj.weight": (dtype, (hidden, width))}


def hf_tensor_shapes(config: dict[str, object], *, dtype: torch.dtype = torch.bfloat16) -> TensorShapes:
    """`{hf key: (dtype, shape)}` of a DeepSeek-V3 checkpoint (router bias in fp32, as shipped)."""
    c: dict[str, Any] = {k: v for k, v in config.items()}  # JSON values, converted with int() below
    hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    qk_head = int(c["qk_nope_head_dim"]) + int(c["qk_rope_head_dim"])
    shapes: TensorShapes = {"model.embed_tokens.weight": (dtype, (int(c["vocab_size"]), hidden))}
    for i in range(int(c["num_hidden_layers"])):
        p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        shapes[f"{p}.input_layernorm.weight"] = (dtype, (hidden,))
        if c.get("q_lora_rank"):
            q = int(c["q_lora_rank"])
            shapes.update({f"{a}.q_a_proj.weight": (dtype, (q, hidden)), f"{a}.q_a_layernorm.weight": (dtype, (q,)),
                           f"{a}.q_b_proj.weight": (dtype, (heads * qk_head, q))})
        else:
            shapes[f"{a}.q_proj.weight"] = (dtype, (heads * qk_head, hidden))
        kv = int(c["kv_lora_rank"])
        shapes.update({
            f"{a}.kv_a_proj_with_mqa.weight": (dtype, (kv + int(c["qk_rope_head_dim"]), hidden)),
            f"{a}.kv_a_layernorm.weight": (dtype, (kv,)),
            f"{a}.kv_b_proj.weight": (dtype, (heads * (int(c["qk_nope_head_dim"]) + int(c["v_head_dim"])), kv)),
            f"{a}.o_proj.weight": (dtype, (hidden, heads * int(c["v_head_dim"]))),
            f"{p}.post_attention_layernorm.weight": (dtype, (hidden,)),
        })
        experts = int(c.get("n_routed_experts") or 0)
        if experts == 0 or i < int(c.get("first_k_dense_replace", 0)):
            shapes.update(_mlp(f"{p}.mlp", hidden, int(c["intermediate_size"]), dtype))
            continue
        width = int(c["moe_intermediate_size"])
        shapes[f"{p}.mlp.gate.weight"] = (dtype, (experts, hidden))
        shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (torch.float32, (experts,))
        for e in range(experts):
            shapes.update(_mlp(f"{p}.mlp.experts.{e}", hidden, width, dtype))
        if int(c.get("n_shared_experts") or 0):
            shapes.update(_mlp(f"{p}.mlp.shared_experts", hidden, width * int(c["n_shared_experts"]), dtype))
    shapes["model.norm.weight"] = (dtype, (hidden,))
    shapes["lm_head.weight"] = (dtype, (int(c["vocab_size"]), hidden))
    return shapes


def random_tensor(key: str, dtype: torch.dtype, shape: tuple[int, ...], *, seed: int) -> torch.Tensor:
    """Deterministic random values for `key` (same seed + key -> same tensor)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, key)) * 31 + len(key))
    return (torch.randn(shape, generator=generator) * 0.05).to(dtype)


def write_synthetic_hf_checkpoint(out_dir: str | Path, config: dict[str, object], *, num_shards: int = 3,
                                  seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> TensorShapes:
    """Write config.json, `num_shards` safetensors shards (about equal bytes) and the index."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = hf_tensor_shapes(config, dtype=dtype)
    sizes = {k: torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for k, (d, s) in shapes.items()}
    groups: list[list[str]] = [[] for _ in range(num_shards)]
    total, done = sum(sizes.values()), 0
    for key in shapes:
        groups[min(num_shards - 1, done * num_shards // total)].append(key)
        done += sizes[key]
    weight_map: dict[str, str] = {}
    groups = [g for g in groups if g]
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        specs = [(k, *shapes[k]) for k in keys]
        write_streaming(out_dir / name, specs,
                        lambda ks: (random_tensor(k, *shapes[k], seed=seed) for k in ks))
        weight_map.update({k: name for k in keys})
    write_index(out_dir, weight_map, total)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return shapes
