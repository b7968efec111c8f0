"""Building blocks: RMSNorm, YaRN rotary embedding, SwiGLU MLP (HF names ``gate_proj``/``up_proj``/
``down_proj``), and ``FrozenWeight``, the no-grad matmul of the frozen (sampling) path. The router
and MoE block live in ``moe.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kimi_core.model.config import ModelConfig


class RMSNorm(nn.Module):
    """``y = w * x / sqrt(mean(x^2) + eps)``, computed in fp32 and cast back before the weight."""

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(cfg: ModelConfig) -> tuple[torch.Tensor, float, float]:
    """Inverse frequencies [rope_dim/2], cos/sin multiplier, and softmax scale.

    Plain RoPE: ``inv_freq_i = theta^(-2i/d)``. YaRN blends interpolated (``/factor``) and
    extrapolated frequencies with a linear ramp over the dims between the correction range
    for ``beta_fast``/``beta_slow`` rotations (floored/ceiled unless ``truncate`` is False). The cos/sin multiplier is
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``; the softmax scale
    ``qk_head_dim^-0.5`` is multiplied by ``mscale(factor, mscale_all_dim)^2``.
    """
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    softmax_scale = cfg.qk_head_dim**-0.5
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0 / pos_freqs, 1.0, softmax_scale
    factor = float(rs["factor"])
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        attention_factor = float(rs["attention_factor"])
    elif mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    if mscale_all_dim:
        softmax_scale *= yarn_mscale(factor, mscale_all_dim) ** 2
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    original = rs["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, attention_factor, softmax_scale


class RotaryEmbedding(nn.Module):
    """Rotations for positions: ``forward(position_ids [B,T]) -> complex [B,T,rope_dim/2]``.

    Entry ``i`` is ``attention_factor * exp(1j * pos * inv_freq_i)``, i.e. ``(cos, sin)`` scaled.
    """

    inv_freq: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_factor, self.softmax_scale = rope_parameters(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        angles = position_ids[..., None].float() * self.inv_freq
        return torch.polar(torch.full_like(angles, self.attention_factor), angles)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x0,x1),(x2,x3),..`` of ``x [..., r]`` by complex ``rope [..., r/2]``.

    Pair ``(a, b)`` becomes ``(a cos - b sin, b cos + a sin)`` (upstream's interleaved RoPE), computed
    in fp32 and kept interleaved. Upstream reorders the output to (all evens, all odds); queries and
    keys share whichever layout is used, so attention scores are the same.
    """
    pairs = torch.view_as_complex(as_fp32(x).reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(pairs * rope).flatten(-2)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


ONEDNN_MIN_PRODUCT = 20_000
"""rows x output features from which ``FrozenWeight`` uses oneDNN (see there)."""
ONEDNN_ROW_BUCKET = 64
"""``FrozenWeight`` pads oneDNN's rows to a multiple of this (see ``FrozenWeight._onednn``)."""


def _onednn_linear_available() -> bool:
    available = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]  # untyped upstream
    return bool(available) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class FrozenWeight:
    """``x @ W`` for one fixed ``W [in, out]`` in no-grad code: the frozen (sampling) path.

    ATen's fp32 ``matmul`` on CPU calls MKL's sgemm, which repacks ``W`` on every call and, on AMD
    CPUs, runs its AVX2 kernel. Where PyTorch has oneDNN (x86 builds), a ``[out, in]`` copy of the
    weight is also kept for oneDNN's GEMM (``torch.ops.mkldnn._linear_pointwise``, the op Inductor's
    CPU weight freezing uses), and products of at least ``ONEDNN_MIN_PRODUCT`` rows x outputs go there:
    ``benchmarks/gemm_paths.py`` measured it 1.5-1.9x faster at 256 rows and 2.0-2.3x at 1536 on a
    2-core AMD EPYC, while for 32 rows x up to 256 outputs its ~10 us call overhead loses to MKL.
    The threshold (about 160 rows at 128 outputs) is where whole ``generate`` calls got faster: at
    32 rows oneDNN won isolated calls with 300-512 outputs, but not inside the decode loop.
    The copy stays a plain tensor: reordering it once to oneDNN's blocked layout
    (``_reorder_linear_weight``) made each freeze 4x slower for a few % per call. Both paths give the
    same numbers up to float rounding. Other dtypes and devices use ``matmul`` only.
    """

    def __init__(self, weight_t: torch.Tensor) -> None:
        self.weight_t = weight_t.contiguous()
        self.onednn_weight: torch.Tensor | None = None  # W [out, in]
        if weight_t.device.type == "cpu" and weight_t.dtype == torch.float32 and _onednn_linear_available():
            self.onednn_weight = weight_t.t().contiguous()

    @property
    def out_features(self) -> int:
        return self.weight_t.shape[1]

    def takes_onednn(self, rows: int) -> bool:
        """Whether a product with ``rows`` rows goes to oneDNN (see the class docstring)."""
        return self.onednn_weight is not None and rows * self.out_features >= ONEDNN_MIN_PRODUCT

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``."""
        rows = x.numel() // x.shape[-1]
        if self.takes_onednn(rows):
            return self._onednn(x.reshape(rows, -1)).view(*x.shape[:-1], self.out_features)
        return x @ self.weight_t

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + x @ W`` for 2-D ``x [N, in]`` and ``residual [N, out]``."""
        if self.takes_onednn(x.shape[0]):
            return self._onednn(x).add_(residual)
        return torch.addmm(residual, x, self.weight_t)

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        """oneDNN's ``x [N, in] @ W`` with ``N`` zero-padded to a multiple of ``ONEDNN_ROW_BUCKET``:
        oneDNN builds (JIT-compiles) a kernel per shape, ~0.8 ms each, and the sampler's row count
        changes at every step where rows finish (868 shapes in 10 rollouts of the local recipe)."""
        rows = x.shape[0]
        padded = -(-rows // ONEDNN_ROW_BUCKET) * ONEDNN_ROW_BUCKET
        if padded != rows:
            x = F.pad(x, (0, 0, 0, padded - rows))
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.onednn_weight, None, "none", [], "")
        return out[:rows]


def as_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x.float()`` without a dispatch when ``x`` is already fp32 (the decode loop calls it per layer)."""
    return x if x.dtype == torch.float32 else x.float()


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``.

    ``freeze()`` caches decode-friendly copies (``[D, 2I]`` gate|up and ``[I, D]`` down, as
    ``FrozenWeight``) that no-grad forwards use until ``thaw()``; see ``KimiForCausalLM.frozen_weights``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self._frozen: tuple[FrozenWeight, FrozenWeight] | None = None

    def forward(self, x: torch.Tensor, *, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., D] -> [..., D]``; plus ``residual`` (same shape) when given."""
        if self._frozen is not None and not torch.is_grad_enabled():
            gate_up, down = self._frozen
            gate, up = gate_up(x).chunk(2, dim=-1)
            hidden = F.silu(gate).mul_(up)
            if residual is None:
                return down(hidden)
            flat = hidden.reshape(-1, hidden.shape[-1])
            return down.add_to(residual.reshape(flat.shape[0], -1), flat).view(residual.shape)
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out if residual is None else residual + out

    @torch.no_grad()
    def freeze(self) -> None:
        gate_up = torch.cat([self.gate_proj.weight, self.up_proj.weight]).t()
        self._frozen = (FrozenWeight(gate_up), FrozenWeight(self.down_proj.weight.t()))

    def thaw(self) -> None:
        self._frozen = None
