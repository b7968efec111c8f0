"""Multi-head latent attention (MLA) with decoupled RoPE, and its compressed KV cache.

Per token: ``c_q = RMSNorm(x W_qa)`` (or no compression), ``q = c_q W_qb`` split per head into
``q_nope [nope]`` and ``q_rope [rope]``; ``[c_kv, k_rope] = x W_kva``, ``c_kv = RMSNorm(c_kv)``;
``[k_nope, v] = c_kv W_kvb`` per head; ``k_rope`` is one head shared by all. RoPE rotates
``q_rope`` and ``k_rope``; scores are ``(q_nope.k_nope + q_rope.k_rope) * softmax_scale``.
The cache stores only the latent ``[c_kv, k_rope]`` (``kv_lora_rank + rope`` numbers per token
and layer). By default keys/values are expanded per head from the latent (as upstream). Inside
``KimiForCausalLM.frozen_weights`` (sampling), cached no-grad calls use the equivalent absorbed
form, which never expands the latent: with ``W_uk``/``W_uv`` the key/value rows of ``W_kvb``,
``q_lat = q_nope W_uk`` (folded into the query projection), scores ``= [q_lat, q_rope] .
[c_kv, k_rope] * scale``, ``ctx = softmax . c_kv``, ``out = ctx W_uv^T W_o^T`` (folded into one
``[H*kv, D]`` matrix).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kimi_core.model.config import ModelConfig
from kimi_core.model.layers import FrozenWeight, RMSNorm, apply_rope

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the default eps upstream, not rms_norm_eps


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, *, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` for ``q, k [B,H,T,d]``, ``v [B,H,S,dv]`` and an additive
    ``bias`` (0 / -inf) that leaves every query at least one key.

    On CPU, ``F.scaled_dot_product_attention`` with a mask runs its math backend, and this is that
    backend's computation in its order (ATen's ``_scaled_dot_product_attention_math``: q and k each
    scaled by ``sqrt(scale)``, the mask added in place, softmax, times v), the same numbers and
    gradients bitwise (tests/model/test_attention.py), minus its guard for queries that see no key
    (``_safe_softmax``: three more passes over the scores), which our masks never make: about half
    the forward's time at the local recipe's training shapes. Other devices use SDPA's fused kernels."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    root = math.sqrt(scale)
    scores = torch.matmul(q * root, k.transpose(-2, -1) * root)
    return torch.matmul(torch.softmax(scores.add_(bias), dim=-1), v)


class MLACache:
    """Preallocated compressed KV cache for incremental decoding of a left-aligned batch.

    Every row shares the write offset ``length`` (prompts are left-padded to one length), so
    step ``t`` writes slot ``length``. ``key_mask [B, max_len]`` marks real (non-pad) slots (and
    ``key_bias`` is the same as an additive 0 / -inf mask for decode steps), and
    ``next_position [B]`` is each row's next RoPE position (= number of real tokens so far).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.latent = torch.zeros(cfg.num_hidden_layers, batch_size, max_len, width, dtype=dtype, device=device)
        self._buffers: tuple[torch.Tensor, torch.Tensor | None] = (self.latent, None)  # (live, spare): keep_rows
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.key_bias = torch.full((batch_size, max_len), float("-inf"), dtype=dtype, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0]

    def write(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        """Store ``latent [B,T,kv_rank+rope]`` at slot ``length``; return slots ``[B, length+T, .]``."""
        end = self.length + latent.shape[1]
        if end > self.max_len:
            raise ValueError(f"MLACache overflow: {end} tokens > max_len={self.max_len}")
        self.latent[layer, :, self.length : end] = latent
        return self.latent[layer, :, :end]

    def append_mask(self, mask: torch.Tensor) -> None:
        """Record the pad mask of the ``T`` new tokens (before the layers run)."""
        self.key_mask[:, self.length : self.length + mask.shape[1]] = mask
        self.key_bias[:, self.length : self.length + mask.shape[1]].masked_fill_(mask, 0.0)

    def append_real_token(self) -> torch.Tensor:
        """Decode step with one real token per row: mark slot ``length`` and return the additive
        bias ``[B, 1, length+1]`` (0 = real key, -inf = pad) that the new queries use."""
        if self.length >= self.max_len:
            raise ValueError(f"MLACache overflow: {self.length + 1} tokens > max_len={self.max_len}")
        self.key_mask[:, self.length] = True
        self.key_bias[:, self.length] = 0.0
        return self.key_bias[:, None, : self.length + 1]

    def advance_one(self) -> None:
        """``advance`` after ``append_real_token``: one slot, one real token per row."""
        self.length += 1
        self.next_position += 1

    def advance(self, num_tokens: int, mask: torch.Tensor) -> None:
        """Move the write offset past ``num_tokens`` and count real tokens per row."""
        self.length += num_tokens
        self.next_position += mask.sum(dim=1)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows [B']``, in that order: finished rows leave, and a row may be
        repeated (a prompt prefilled once, then one row per sample).

        The latent moves into the spare of two buffers (made when missing or too small) instead
        of a new tensor per call: for an eval batch a new one is larger than the biggest block
        glibc reuses (32 MiB), so each call mapped and faulted in fresh pages, which cost 2-3x
        more in a Ray worker than in a plain process (docs/design.md §5, engine speed)."""
        live, spare = self._buffers
        kept = rows.numel()
        if spare is None or spare.shape[1] < kept:
            spare = live.new_empty((live.shape[0], kept, *live.shape[2:]))
        for layer in range(live.shape[0]):
            torch.index_select(self.latent[layer], 0, rows, out=spare[layer, :kept])
        self._buffers = (spare, live)
        self.latent = spare[:, :kept]
        self.key_mask = self.key_mask.index_select(0, rows)
        self.key_bias = self.key_bias.index_select(0, rows)
        self.next_position = self.next_position.index_select(0, rows)


class MLAttention(nn.Module):
    """MLA block; submodule names follow the HF checkpoint (``q_a_proj``, ``kv_b_proj``, ...)."""

    def __init__(self, cfg: ModelConfig, *, layer_idx: int, softmax_scale: float) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.q_rank = cfg.q_lora_rank
        self.softmax_scale = softmax_scale
        q_out = self.num_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, cfg.hidden_size, bias=False)
        self._frozen: dict[str, FrozenWeight] | None = None

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: torch.Tensor,
        bias: torch.Tensor,
        cache: MLACache | None,
        last_only: bool = False,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [B,T,D]``, complex rotations ``rope [B,T,r/2]``, additive ``bias [B,T,S]`` (0 / -inf).

        Output ``[B,T,D]``, or ``[B,1,D]`` for the last query only with ``last_only`` (keys, values
        and the cache still cover all ``T`` new tokens); plus ``residual`` (the output's shape)
        when given."""
        if cache is not None and self._frozen is not None and not torch.is_grad_enabled():
            return self._absorbed(x, rope=rope, bias=bias, cache=cache, last_only=last_only, residual=residual)
        bsz, seq, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(bsz, seq, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        # one rotation for the H query heads and the shared key head: [B,T,H+1,r]
        rotated = apply_rope(torch.cat([q_rope, k_rope.unsqueeze(2)], dim=2), rope.unsqueeze(2))
        latent = torch.cat([self.kv_a_layernorm(c_kv), rotated[:, :, -1]], dim=-1)
        if cache is not None:
            latent = cache.write(self.layer_idx, latent)
        keys_len = latent.shape[1]
        kv = self.kv_b_proj(latent[..., : self.kv_rank]).view(bsz, keys_len, self.num_heads, -1)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rope = latent[:, :, None, self.kv_rank :].expand(-1, -1, self.num_heads, -1)
        q = torch.cat([q_nope, rotated[:, :, :-1]], dim=-1).transpose(1, 2)
        if last_only:
            q, bias, seq = q[:, :, -1:], bias[:, -1:], 1
        k = torch.cat([k_nope, k_rope], dim=-1).transpose(1, 2)
        out = masked_attention(q, k, v.transpose(1, 2), bias.unsqueeze(1), scale=self.softmax_scale)
        projected: torch.Tensor = self.o_proj(out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.v_dim))
        return projected if residual is None else residual + projected

    @torch.no_grad()
    def freeze(self) -> None:
        """Absorbed, pre-transposed weights for cached decoding.

        ``in_t [D, (q_rank | H*(kv+r)) + kv + r]``: the first projections side by side;
        ``q_t [q_rank, H*kv + H*r]`` (with q compression): per head ``W_qnope^T W_uk`` then the rope
        query columns, times the softmax scale; ``o_t [H*kv, D]``: per head ``W_uv^T W_o_h^T``.
        """
        heads, kv, rope_dim = self.num_heads, self.kv_rank, self.rope_dim
        w_kvb = self.kv_b_proj.weight.float().view(heads, self.nope_dim + self.v_dim, kv)
        w_q = self.q_proj.weight if self.q_rank is None else self.q_b_proj.weight
        w_q = w_q.float().view(heads, self.nope_dim + rope_dim, -1)  # [H, qk, in]
        q_lat = torch.einsum("hni,hnk->ihk", w_q[:, : self.nope_dim], w_kvb[:, : self.nope_dim])
        q_rope = w_q[:, self.nope_dim :].permute(2, 0, 1)
        q_t = torch.cat([q_lat.flatten(1), q_rope.flatten(1)], dim=1) * self.softmax_scale
        w_o = self.o_proj.weight.float().view(-1, heads, self.v_dim)  # [D, H, v]
        o_t = torch.einsum("hvk,dhv->hkd", w_kvb[:, self.nope_dim :], w_o).flatten(0, 1)
        kv_a = self.kv_a_proj_with_mqa.weight.float()
        dtype = self.o_proj.weight.dtype
        if self.q_rank is None:
            frozen = {"in_t": torch.cat([q_t, kv_a.t()], dim=1)}
        else:
            frozen = {"in_t": torch.cat([self.q_a_proj.weight.float(), kv_a]).t(), "q_t": q_t}
        frozen["o_t"] = o_t
        self._frozen = {k: FrozenWeight(v.to(dtype)) for k, v in frozen.items()}

    def thaw(self) -> None:
        self._frozen = None

    def _absorbed(
        self,
        x: torch.Tensor,
        *,
        rope: torch.Tensor,
        bias: torch.Tensor,
        cache: MLACache,
        last_only: bool,
        residual: torch.Tensor | None,
    ) -> torch.Tensor:
        """Cached attention on the latent with the absorbed weights (see ``freeze``); ``[B,T,D]``
        (``[B,1,D]`` with ``last_only``), plus ``residual`` when given."""
        assert self._frozen is not None
        bsz, seq, _ = x.shape
        heads, kv, rope_dim = self.num_heads, self.kv_rank, self.rope_dim
        first = self._frozen["in_t"].out_features - kv - rope_dim
        q, c_kv, k_rope = torch.split(self._frozen["in_t"](x), [first, kv, rope_dim], dim=-1)
        if last_only:  # the latent covers all T tokens, queries only the last one
            q_last = q[:, -1:]
            if self.q_rank is not None:
                q_last = self._frozen["q_t"](self.q_a_layernorm(q_last))
            q_lat, q_rope = torch.split(q_last, [heads * kv, heads * rope_dim], dim=-1)
            k_rot = apply_rope(k_rope, rope)  # elementwise: the same numbers as the joint rotation
            q_rot = apply_rope(q_rope.view(bsz, 1, heads, rope_dim), rope[:, -1:].unsqueeze(2))
            latent = cache.write(self.layer_idx, torch.cat([self.kv_a_layernorm(c_kv), k_rot], dim=-1))
            queries = torch.cat([q_lat.view(bsz, 1, heads, kv), q_rot], dim=-1)
            bias, seq = bias[:, -1:], 1
        else:
            if self.q_rank is not None:
                q = self._frozen["q_t"](self.q_a_layernorm(q))
            q_lat, q_rope = torch.split(q, [heads * kv, heads * rope_dim], dim=-1)
            pairs = torch.cat([q_rope.view(bsz, seq, heads, rope_dim), k_rope.unsqueeze(2)], dim=2)
            rotated = apply_rope(pairs, rope.unsqueeze(2))  # [B,T,H+1,r]
            latent = cache.write(self.layer_idx, torch.cat([self.kv_a_layernorm(c_kv), rotated[:, :, -1]], dim=-1))
            queries = torch.cat([q_lat.view(bsz, seq, heads, kv), rotated[:, :, :-1]], dim=-1)
        if seq == 1:  # decode: the bias [B,1,S] broadcasts over the heads; 0 / -inf adds exactly as below
            scores = torch.baddbmm(bias, queries.view(bsz, heads, -1), latent.transpose(1, 2))
        else:
            scores = torch.bmm(queries.view(bsz, seq * heads, -1), latent.transpose(1, 2))
            scores = (scores.view(bsz, seq, heads, -1) + bias.unsqueeze(2)).view(bsz, seq * heads, -1)
        ctx = torch.bmm(torch.softmax(scores, dim=-1), latent[..., :kv])
        if residual is None:
            return self._frozen["o_t"](ctx.view(bsz, seq, heads * kv))
        out = self._frozen["o_t"].add_to(residual.reshape(bsz * seq, -1), ctx.view(bsz * seq, heads * kv))
        return out.view(bsz, seq, -1)
