"""Kimi-K2 / DeepSeek-V3 causal LM in plain torch, with HF-identical state_dict key names.

``KimiForCausalLM.forward(input_ids [B,T], *, position_ids, attention_mask, cache) -> logits
[B,T,V]``. Pre-norm decoder: ``h += MLA(RMSNorm(h)); h += FFN(RMSNorm(h))`` where FFN is a dense
SwiGLU in the first ``first_k_dense_replace`` layers and the MoE after; final RMSNorm; untied
``lm_head``.

Padding: ``attention_mask`` (1 = real token, 0 = pad) masks pad keys; left padding is the
supported layout. When ``position_ids`` is omitted, positions count real tokens only
(``cumsum(mask) - 1`` plus the tokens already in the cache), so a left-padded row gets the same
logits as the unpadded sequence. Pad query rows always see themselves (no all-masked softmax).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from kimi_core.model.attention import MLACache, MLAttention
from kimi_core.model.config import ModelConfig
from kimi_core.model.layers import MLP, FrozenWeight, RMSNorm, RotaryEmbedding
from kimi_core.model.moe import MoE, Router

INIT_STD = 0.02


@runtime_checkable
class _Freezable(Protocol):
    """A module with decode-friendly weight copies (see ``KimiForCausalLM.frozen_weights``)."""

    def freeze(self) -> None: ...

    def thaw(self) -> None: ...


class DecoderLayer(nn.Module):
    """``h + MLA(norm(h))`` then ``+ FFN(norm(.))``; FFN dense below ``first_k_dense_replace``."""

    def __init__(self, cfg: ModelConfig, *, layer_idx: int, softmax_scale: float) -> None:
        super().__init__()
        self.self_attn = MLAttention(cfg, layer_idx=layer_idx, softmax_scale=softmax_scale)
        if layer_idx < cfg.first_k_dense_replace:
            self.mlp: nn.Module = MLP(cfg.hidden_size, cfg.intermediate_size)
        else:
            self.mlp = MoE(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,
        *,
        rope: torch.Tensor,
        bias: torch.Tensor,
        cache: MLACache | None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """``last_only``: keys/values (and the cache) cover every position, but only the last
        position's output ``[B,1,D]`` is computed (the top layer when only the last logits matter)."""
        residual = h[:, -1:] if last_only else h
        h = self.self_attn(
            self.input_layernorm(h), rope=rope, bias=bias, cache=cache, last_only=last_only, residual=residual
        )
        out: torch.Tensor = self.mlp(self.post_attention_layernorm(h), residual=h)
        return out


class Backbone(nn.Module):
    """Embedding, decoder layers, final norm (the HF ``model.`` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.rotary_emb = RotaryEmbedding(cfg)
        scale = self.rotary_emb.softmax_scale
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, layer_idx=i, softmax_scale=scale) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class KimiForCausalLM(nn.Module):
    """DeepSeek-V3-shaped causal LM; ``state_dict()`` keys equal the HF DeepseekV3 checkpoint keys."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._frozen_head: FrozenWeight | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, *, std: float = INIT_STD) -> None:
        """Random init: N(0, std) for linear/embedding/router weights, ones for norms, zero bias."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, Router):  # the only module with an e_score_correction_bias
                module.weight.normal_(0.0, std)
                module.e_score_correction_bias.zero_()

    @contextmanager
    def frozen_weights(self) -> Iterator[KimiForCausalLM]:
        """Within the block, no-grad forwards use decode-friendly copies of the weights:
        pre-transposed and fused projections (gate|up, q_a|kv_a, the router with the shared
        expert), MLA with ``W_uk``/``W_uv`` absorbed into the query/output projections (cached
        calls), stacked routed experts, each matmul's weight also in oneDNN's layout
        (``FrozenWeight``).

        ``generate`` uses it. The copies are taken on entry, so weights must not change inside
        the block; they cost about three times the weights' memory while it lasts (the CPU/toy
        engine's trade of memory for speed). Autograd-enabled calls ignore them.
        """
        frozen = [m for m in self.modules() if m is not self and isinstance(m, _Freezable)]
        for module in frozen:
            module.freeze()
        self._frozen_head = FrozenWeight(self.lm_head.weight.detach().t())
        try:
            yield self
        finally:
            self._frozen_head = None
            for module in frozen:
                module.thaw()

    def new_cache(self, *, batch_size: int, max_len: int) -> MLACache:
        """An empty compressed KV cache sized for ``max_len`` total tokens per row."""
        p = self.lm_head.weight
        return MLACache(self.config, batch_size=batch_size, max_len=max_len, dtype=p.dtype, device=p.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: MLACache | None = None,
        last_token_only: bool = False,
    ) -> torch.Tensor:
        """Logits ``[B,T,V]`` (``[B,1,V]`` with ``last_token_only``) for ``input_ids [B,T]``.

        ``attention_mask [B,T]`` covers the new tokens only; the cache remembers earlier ones.
        """
        if cache is not None and attention_mask is None and input_ids.shape[1] == 1:
            return self._decode_step(input_ids, position_ids=position_ids, cache=cache)
        bsz, seq = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones(bsz, seq, dtype=torch.bool, device=device)
        new_mask = attention_mask.bool()
        past = cache.length if cache is not None else 0
        if position_ids is None:
            start = cache.next_position[:, None] if cache is not None else 0
            position_ids = (start + new_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        if cache is not None:
            cache.append_mask(new_mask)
            key_mask = cache.key_mask[:, : past + seq]
        else:
            key_mask = new_mask
        h = self.model.embed_tokens(input_ids)
        bias = _attention_bias(key_mask, past=past, seq=seq, dtype=h.dtype)
        rope = self.model.rotary_emb(position_ids)
        top = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            h = layer(h, rope=rope, bias=bias, cache=cache, last_only=last_token_only and i == top)
        if cache is not None:
            cache.advance(seq, new_mask)
        return self._head(self.model.norm(h))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of the final-normed hidden states (the frozen copy inside ``frozen_weights``)."""
        if self._frozen_head is not None and not torch.is_grad_enabled():
            return self._frozen_head(h)
        logits: torch.Tensor = self.lm_head(h)
        return logits

    def _decode_step(
        self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None, cache: MLACache
    ) -> torch.Tensor:
        """One real new token per row (the sampler's decode step): the same values as the general
        path, with the cache's running additive bias and position counter instead of rebuilding
        the mask, cumsum and bias each step. ``[B,1,V]``."""
        if position_ids is None:
            position_ids = cache.next_position[:, None]
        bias = cache.append_real_token()
        h = self.model.embed_tokens(input_ids)
        rope = self.model.rotary_emb(position_ids)
        for layer in self.model.layers:
            h = layer(h, rope=rope, bias=bias, cache=cache)
        cache.advance_one()
        return self._head(self.model.norm(h))


def _attention_bias(key_mask: torch.Tensor, *, past: int, seq: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[B,T,S]`` (0 = attend, -inf = masked): query ``t`` (absolute slot ``past+t``)
    sees real keys ``s <= past+t`` and always itself."""
    total = key_mask.shape[1]
    if seq == 1:  # decoding: every real cached key and the new token
        allowed = key_mask.clone()
        allowed[:, -1] = True
        allowed = allowed[:, None, :]
    else:
        query_slot = torch.arange(past, past + seq, device=key_mask.device)[:, None]
        key_slot = torch.arange(total, device=key_mask.device)[None, :]
        allowed = ((key_slot <= query_slot)[None] & key_mask[:, None, :]) | (key_slot == query_slot)[None]
    return torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device).masked_fill_(~allowed, float("-inf"))
