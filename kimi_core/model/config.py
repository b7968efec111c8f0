"""Model configuration: the HF ``deepseek_v3`` config.json fields the Kimi-K2 backbone uses.

Defaults equal those of ``transformers.DeepseekV3Config`` so that a config.json missing a key
means the same thing to us as to ``transformers``. ``tiny_config`` is the toy flavor used on CPU:
it keeps every mechanism (MLA with q compression, decoupled RoPE with YaRN, dense first layer,
sigmoid group-limited router with a correction bias, shared expert, untied head).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCEPTED_MODEL_TYPES = ("deepseek_v3", "kimi_k2")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeepSeek-V3-shaped causal LM (Kimi-K2 / K2.5 text backbone)."""

    vocab_size: int = 129280
    """Number of token ids (embedding rows and lm_head outputs)."""
    hidden_size: int = 7168
    """Residual stream width."""
    intermediate_size: int = 18432
    """Width of the dense SwiGLU FFN in the first ``first_k_dense_replace`` layers."""
    moe_intermediate_size: int = 2048
    """Width of each routed expert (and, times ``n_shared_experts``, of the shared expert)."""
    num_hidden_layers: int = 61
    """Number of decoder layers."""
    num_attention_heads: int = 128
    """Number of attention heads."""
    num_key_value_heads: int = 128
    """Must equal ``num_attention_heads`` (MLA expands the latent to every head)."""
    n_shared_experts: int = 1
    """Shared experts, fused into one SwiGLU of width ``n_shared_experts * moe_intermediate_size``."""
    n_routed_experts: int = 256
    """Routed experts per MoE layer."""
    routed_scaling_factor: float = 2.5
    """Multiplier on the (normalized) top-k routing weights."""
    kv_lora_rank: int = 512
    """Width of the compressed KV latent ``c_kv`` (what the cache stores)."""
    q_lora_rank: int | None = 1536
    """Width of the compressed query latent; ``None`` = a plain ``q_proj``."""
    qk_rope_head_dim: int = 64
    """Per-head query/key dims that carry RoPE (the key part is shared by all heads)."""
    v_head_dim: int = 128
    """Per-head value dims."""
    qk_nope_head_dim: int = 128
    """Per-head query/key dims without position encoding."""
    n_group: int = 8
    """Expert groups for group-limited routing; must divide ``n_routed_experts``."""
    topk_group: int = 4
    """Groups a token may route into."""
    num_experts_per_tok: int = 8
    """Routed experts per token (top-k)."""
    first_k_dense_replace: int = 3
    """Layers ``0 .. first_k_dense_replace-1`` use the dense FFN, the rest MoE."""
    norm_topk_prob: bool = True
    """Normalize the top-k sigmoid scores to sum to one before scaling."""
    scoring_func: str = "sigmoid"
    """Router score function; only ``sigmoid`` is supported."""
    topk_method: str = "noaux_tc"
    """Router selection method; only ``noaux_tc`` (bias-corrected, group-limited) is supported."""
    hidden_act: str = "silu"
    """FFN activation; only ``silu`` (SwiGLU) is supported."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the residual-stream RMSNorms (the latent norms always use 1e-6, as upstream)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = None
    """YaRN parameters (``type``/``rope_type`` 'yarn', factor, original_max_position_embeddings,
    beta_fast, beta_slow, mscale, mscale_all_dim) or ``None`` for plain RoPE."""
    max_position_embeddings: int = 4096
    """Maximum sequence length the model is configured for."""
    tie_word_embeddings: bool = False
    """Must be False: Kimi/DeepSeek use an untied lm_head."""
    bos_token_id: int | None = 0
    """Beginning-of-sequence id."""
    eos_token_id: int | list[int] | None = 1
    """End-of-sequence id(s)."""
    pad_token_id: int | None = None
    """Padding id (embedding row is an ordinary row; padding is handled by masks)."""
    torch_dtype: str = "bfloat16"
    """Storage dtype recorded in config.json."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Unused keys from the source config.json, kept only for reference."""

    def __post_init__(self) -> None:
        if self.rope_scaling is not None:  # canonical form: "rope_type" instead of legacy "type"
            rope = {k: v for k, v in self.rope_scaling.items() if k not in ("type", "rope_theta")}
            rope["rope_type"] = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            object.__setattr__(self, "rope_scaling", dict(sorted(rope.items())))
        _validate(self)

    @property
    def qk_head_dim(self) -> int:
        """Query/key dims per head: ``qk_nope_head_dim + qk_rope_head_dim``."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a HF config.json dict; unknown keys are ignored (kept in ``extra``).

        Accepts both the legacy ``rope_theta`` + ``rope_scaling`` layout and the transformers-5
        ``rope_parameters`` layout, and ``torch_dtype`` or ``dtype``.
        """
        model_type = d.get("model_type")
        if model_type not in ACCEPTED_MODEL_TYPES:
            raise ValueError(
                f"config model_type={model_type!r} is not supported; expected one of {ACCEPTED_MODEL_TYPES}"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        rope_parameters = d.get("rope_parameters")
        if rope_parameters is not None and "rope_scaling" not in d:
            rope = dict(rope_parameters)
            if "rope_theta" in rope and "rope_theta" not in d:
                kwargs["rope_theta"] = rope["rope_theta"]
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            kwargs["rope_scaling"] = None if rope_type == "default" else rope
        if "torch_dtype" not in kwargs and isinstance(d.get("dtype"), str):
            kwargs["torch_dtype"] = d["dtype"]
        kwargs["extra"] = {k: v for k, v in d.items() if k not in names}
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that ``transformers.AutoConfig`` / ``DeepseekV3ForCausalLM`` accept."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(self.rope_scaling)
        d.update(
            model_type="deepseek_v3",
            architectures=["DeepseekV3ForCausalLM"],
            rope_interleave=True,
            attention_bias=False,
            attention_dropout=0.0,
            num_nextn_predict_layers=0,
            dtype=self.torch_dtype,
        )
        return d


def _validate(cfg: ModelConfig) -> None:
    """Raise ValueError naming the field for settings this implementation cannot honour."""
    checks = [
        (cfg.num_key_value_heads == cfg.num_attention_heads,
         "num_key_value_heads must equal num_attention_heads (MLA has no grouped KV)"),
        (cfg.n_group >= 1 and cfg.n_routed_experts % cfg.n_group == 0,
         "n_group must divide n_routed_experts"),
        (1 <= cfg.topk_group <= cfg.n_group, "topk_group must be in [1, n_group]"),
        (cfg.n_routed_experts // cfg.n_group >= 2 or cfg.n_group == 1,
         "n_routed_experts / n_group must be >= 2 (group score = sum of its top-2 experts)"),
        (1 <= cfg.num_experts_per_tok <= cfg.topk_group * (cfg.n_routed_experts // cfg.n_group),
         "num_experts_per_tok must be in [1, topk_group * n_routed_experts / n_group]"),
        (0 <= cfg.first_k_dense_replace <= cfg.num_hidden_layers,
         "first_k_dense_replace must be in [0, num_hidden_layers]"),
        (cfg.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even"),
        (cfg.scoring_func == "sigmoid", "scoring_func must be 'sigmoid'"),
        (cfg.topk_method == "noaux_tc", "topk_method must be 'noaux_tc'"),
        (cfg.hidden_act == "silu", "hidden_act must be 'silu'"),
        (not cfg.tie_word_embeddings, "tie_word_embeddings must be False (untied lm_head)"),
        (cfg.q_lora_rank is None or cfg.q_lora_rank > 0, "q_lora_rank must be positive or None"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"invalid ModelConfig: {message}")
    if cfg.rope_scaling is not None:
        rope_type = cfg.rope_scaling["rope_type"]
        if rope_type != "yarn":
            raise ValueError(f"invalid ModelConfig: rope_scaling type must be 'yarn', got {rope_type!r}")
        for key in ("factor", "original_max_position_embeddings"):
            if key not in cfg.rope_scaling:
                raise ValueError(f"invalid ModelConfig: rope_scaling needs {key!r}")


def load_config(path: str | Path) -> ModelConfig:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no config.json at {file}")
    with file.open() as f:
        return ModelConfig.from_hf_dict(json.load(f))


def tiny_config(**overrides: Any) -> ModelConfig:
    """Toy flavor keeping every mechanism; ``vocab_size`` must be given by the caller.

    3 layers (first dense), hidden 64, 4 heads, MLA (q rank 32, kv rank 16, nope 16, rope 8,
    v 16), 8 routed experts in 2 groups (top-2 within 1 group), 1 shared expert, YaRN x4.
    """
    if "vocab_size" not in overrides:
        raise ValueError("tiny_config needs vocab_size=...")
    base: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=2.827,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        v_head_dim=16,
        qk_nope_head_dim=16,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        rope_scaling=dict(
            type="yarn",
            factor=4.0,
            original_max_position_embeddings=64,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        max_position_embeddings=256,
        torch_dtype="float32",
    )
    if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
        overrides["num_key_value_heads"] = overrides["num_attention_heads"]
    base.update(overrides)
    return ModelConfig(**base)
