"""HF DeepSeek-V3 / Kimi tensor names <-> Megatron-core `torch_dist` tensors.

Each HF tensor is one chunk of one Megatron global tensor, exactly as megatron-core 0.16.1
(Transformer Engine layer spec, TP=1, EP=1) lays a DeepSeek-V3 model out in `torch_dist`:

| HF (`model.layers.{i}.` prefix)          | Megatron global key (`decoder.layers.{i}.` prefix) | chunk |
|---|---|---|
| `input_layernorm`                        | `input_layernorm.weight`                          | whole |
| `self_attn.q_a_proj`                     | `self_attention.linear_q_down_proj.weight`        | whole |
| `self_attn.q_a_layernorm`                | `self_attention.linear_q_up_proj.layer_norm_weight` | whole |
| `self_attn.q_b_proj` (`q_proj` w/o q-LoRA) | `self_attention.linear_q_up_proj.weight` (`linear_q_proj`) | whole |
| `self_attn.kv_a_proj_with_mqa`           | `self_attention.linear_kv_down_proj.weight`       | whole |
| `self_attn.kv_a_layernorm`               | `self_attention.linear_kv_up_proj.layer_norm_weight` | whole |
| `self_attn.kv_b_proj` / `o_proj`         | `self_attention.linear_kv_up_proj` / `linear_proj` | whole |
| `post_attention_layernorm` (MoE layer)   | `pre_mlp_layernorm.weight`                        | whole |
| `post_attention_layernorm` (dense layer) | `mlp.linear_fc1.layer_norm_weight`                | whole |
| `mlp.gate_proj` / `mlp.up_proj`          | `mlp.linear_fc1.weight` = cat(gate, up)           | rows 0:F / F:2F |
| `mlp.down_proj`                          | `mlp.linear_fc2.weight`                           | whole |
| `mlp.gate` / `mlp.gate.e_score_correction_bias` | `mlp.router.weight` / `mlp.router.expert_bias` | whole |
| `mlp.experts.{e}.gate_proj` / `up_proj`  | `mlp.experts.experts.linear_fc1.weight` [E, 2F, H] | [e, 0:F] / [e, F:2F] |
| `mlp.experts.{e}.down_proj`              | `mlp.experts.experts.linear_fc2.weight` [E, H, F] | [e] |
| `mlp.shared_experts.{gate,up,down}_proj` | `mlp.shared_experts.linear_fc1/fc2.weight`        | like dense |

plus `model.embed_tokens` -> `embedding.word_embeddings.weight`, `model.norm` ->
`decoder.final_layernorm.weight`, `lm_head` -> `output_layer.weight`.

Facts behind the table (megatron-core 0.16.1): with the TE spec, a dense layer has
`pre_mlp_layernorm = IdentityOp` and its norm fused into `linear_fc1` (TELayerNormColumnParallelLinear),
so the dense layer's `post_attention_layernorm` is `mlp.linear_fc1.layer_norm_weight`; MoE layers keep
a separate `pre_mlp_layernorm`. The gated `linear_fc1` is saved by `apply_swiglu_sharded_factory`
as two chunks (gate rows, then up rows) of one key, so gate and up never need concatenating.
TEGroupedMLP parameters are named `mlp.experts.linear_fc1.weight{e}` in the module but saved
under `mlp.experts.experts.linear_fc1.weight` with a prepended expert axis (`param_name` keeps the
module name). DeepSeek models pass `moe_layer_freq` as a list, so layers are saved per layer
(`decoder.layers.{i}.…`, "non-homogeneous"), not stacked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

RankOffset = tuple[int, int, int]  # (axis in the global tensor, chunk index, number of chunks)


@dataclass(frozen=True)
class ModelLayout:
    """The parts of an HF DeepSeek-V3 `config.json` that decide which tensors exist."""

    num_layers: int
    first_k_dense_replace: int
    moe_layer_freq: int
    num_experts: int
    num_shared_experts: int
    q_lora_rank: int | None
    has_expert_bias: bool

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelLayout:
        """Build from a parsed `config.json` (JSON values); raises ValueError naming a missing field."""
        for field in ("num_hidden_layers",):
            if field not in config:
                raise ValueError(f"config.json: missing field {field!r}")
        num_experts = int(config.get("n_routed_experts") or 0)
        return cls(
            num_layers=int(config["num_hidden_layers"]),
            first_k_dense_replace=int(config.get("first_k_dense_replace", 0)),
            moe_layer_freq=int(config.get("moe_layer_freq", 1)),
            num_experts=num_experts,
            num_shared_experts=int(config.get("n_shared_experts") or 0),
            q_lora_rank=config.get("q_lora_rank"),
            has_expert_bias=num_experts > 0 and config.get("topk_method", "noaux_tc") == "noaux_tc",
        )

    def is_moe_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)


@dataclass(frozen=True)
class KeySpec:
    """Where one HF tensor goes, independent of its shape.

    The HF tensor is the chunk of `megatron_key` selected by `rank_offsets` (megatron's
    `ShardedTensor.from_rank_offsets` convention), after `prepend_axis_num` leading axes of
    size 1 are added (the expert axis).
    """

    hf_key: str
    megatron_key: str
    param_name: str
    prepend_axis_num: int = 0
    rank_offsets: tuple[RankOffset, ...] = ()


@dataclass(frozen=True)
class TensorPlacement:
    """A `KeySpec` with the HF tensor's dtype and shape: enough to build a `ShardedTensor`."""

    spec: KeySpec
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def global_shape(self) -> tuple[int, ...]:
        full = [1] * self.spec.prepend_axis_num + list(self.shape)
        for axis, _, fragments in self.spec.rank_offsets:
            full[axis] *= fragments
        return tuple(full)

    @property
    def global_offset(self) -> tuple[int, ...]:
        local = [1] * self.spec.prepend_axis_num + list(self.shape)
        offset = [0] * len(local)
        for axis, index, _ in self.spec.rank_offsets:
            offset[axis] = index * local[axis]
        return tuple(offset)

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def _gated(hf_prefix: str, mcore_key: str, param_name: str, *, expert: tuple[int, int] | None = None
           ) -> list[KeySpec]:
    """gate/up/down of one SwiGLU MLP: fc1 = cat(gate, up) along rows, fc2 = down."""
    prepend = 1 if expert else 0
    lead: tuple[RankOffset, ...] = ((0, expert[0], expert[1]),) if expert else ()
    suffix = str(expert[0]) if expert else ""
    return [
        KeySpec(f"{hf_prefix}.gate_proj.weight", f"{mcore_key}.linear_fc1.weight",
                f"{param_name}.linear_fc1.weight{suffix}", prepend, (*lead, (prepend, 0, 2))),
        KeySpec(f"{hf_prefix}.up_proj.weight", f"{mcore_key}.linear_fc1.weight",
                f"{param_name}.linear_fc1.weight{suffix}", prepend, (*lead, (prepend, 1, 2))),
        KeySpec(f"{hf_prefix}.down_proj.weight", f"{mcore_key}.linear_fc2.weight",
                f"{param_name}.linear_fc2.weight{suffix}", prepend, lead),
    ]


def _whole(hf_key: str, mcore_key: str) -> KeySpec:
    return KeySpec(hf_key, mcore_key, mcore_key)


def layer_specs(layout: ModelLayout, layer: int) -> list[KeySpec]:
    """Every HF tensor of decoder layer `layer`, in HF order."""
    hf, mc = f"model.layers.{layer}", f"decoder.layers.{layer}"
    att, sa = f"{hf}.self_attn", f"{mc}.self_attention"
    specs = [_whole(f"{hf}.input_layernorm.weight", f"{mc}.input_layernorm.weight")]
    if layout.q_lora_rank:
        specs += [_whole(f"{att}.q_a_proj.weight", f"{sa}.linear_q_down_proj.weight"),
                  _whole(f"{att}.q_a_layernorm.weight", f"{sa}.linear_q_up_proj.layer_norm_weight"),
                  _whole(f"{att}.q_b_proj.weight", f"{sa}.linear_q_up_proj.weight")]
    else:
        specs.append(_whole(f"{att}.q_proj.weight", f"{sa}.linear_q_proj.weight"))
    specs += [_whole(f"{att}.kv_a_proj_with_mqa.weight", f"{sa}.linear_kv_down_proj.weight"),
              _whole(f"{att}.kv_a_layernorm.weight", f"{sa}.linear_kv_up_proj.layer_norm_weight"),
              _whole(f"{att}.kv_b_proj.weight", f"{sa}.linear_kv_up_proj.weight"),
              _whole(f"{att}.o_proj.weight", f"{sa}.linear_proj.weight")]
    if not layout.is_moe_layer(layer):
        specs.append(_whole(f"{hf}.post_attention_layernorm.weight",
                            f"{mc}.mlp.linear_fc1.layer_norm_weight"))
        return specs + _gated(f"{hf}.mlp", f"{mc}.mlp", f"{mc}.mlp")
    specs += [_whole(f"{hf}.post_attention_layernorm.weight", f"{mc}.pre_mlp_layernorm.weight"),
              _whole(f"{hf}.mlp.gate.weight", f"{mc}.mlp.router.weight")]
    if layout.has_expert_bias:
        specs.append(_whole(f"{hf}.mlp.gate.e_score_correction_bias", f"{mc}.mlp.router.expert_bias"))
    for expert in range(layout.num_experts):
        specs += _gated(f"{hf}.mlp.experts.{expert}", f"{mc}.mlp.experts.experts",
                        f"{mc}.mlp.experts", expert=(expert, layout.num_experts))
    if layout.num_shared_experts:
        specs += _gated(f"{hf}.mlp.shared_experts", f"{mc}.mlp.shared_experts",
                        f"{mc}.mlp.shared_experts")
    return specs


def model_specs(layout: ModelLayout) -> list[KeySpec]:
    """Every HF tensor of the model (no MTP layers), in HF order."""
    specs = [_whole("model.embed_tokens.weight", "embedding.word_embeddings.weight")]
    for layer in range(layout.num_layers):
        specs += layer_specs(layout, layer)
    specs += [_whole("model.norm.weight", "decoder.final_layernorm.weight"),
              _whole("lm_head.weight", "output_layer.weight")]
    return specs


def check_key_sets(expected: list[str], present: list[str], *, where: str) -> None:
    """Raise ValueError naming missing and unexpected keys (at most 10 of each)."""
    exp, got = set(expected), set(present)
    missing, unexpected = sorted(exp - got), sorted(got - exp)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:10]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:10]}")
        raise ValueError(f"{where}: " + "; ".join(parts))


def place_hf_tensors(layout: ModelLayout, hf_tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                     *, where: str = "checkpoint") -> list[TensorPlacement]:
    """Placements for the HF tensors `{key: (dtype, shape)}`; raises on missing/unexpected keys
    and on gate/up pairs of different shapes."""
    specs = model_specs(layout)
    check_key_sets([s.hf_key for s in specs], list(hf_tensors), where=where)
    placements = [TensorPlacement(s, *hf_tensors[s.hf_key]) for s in specs]
    global_shapes: dict[str, tuple[int, ...]] = {}
    for p in placements:
        known = global_shapes.setdefault(p.spec.megatron_key, p.global_shape)
        if known != p.global_shape:
            raise ValueError(f"{where}: {p.spec.hf_key} has shape {p.shape}, inconsistent with the "
                             f"other chunks of {p.spec.megatron_key} (global {known})")
    return placements


def place_from_megatron(layout: ModelLayout,
                        global_tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                        *, where: str = "torch_dist checkpoint") -> list[TensorPlacement]:
    """Placements recovered from a torch_dist checkpoint's `{global key: (dtype, global shape)}`."""
    specs = model_specs(layout)
    check_key_sets(sorted({s.megatron_key for s in specs}), list(global_tensors), where=where)
    placements = []
    for spec in specs:
        dtype, global_shape = global_tensors[spec.megatron_key]
        local = list(global_shape)
        for axis, _, fragments in spec.rank_offsets:
            if local[axis] % fragments:
                raise ValueError(f"{where}: {spec.megatron_key} axis {axis} of size {local[axis]} "
                                 f"does not split into {fragments} chunks")
            local[axis] //= fragments
        placements.append(TensorPlacement(spec, dtype, tuple(local[spec.prepend_axis_num:])))
    return placements
