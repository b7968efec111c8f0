"""`masked_attention` is `F.scaled_dot_product_attention` on CPU, bit for bit, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimi_core.model.attention import masked_attention


def _bias(rows: int, queries: int, keys: int, seed: int) -> torch.Tensor:
    """``[B,1,T,S]`` additive 0 / -inf: causal over the last ``T`` of ``S`` slots, right padding per row,
    every query sees itself (the model's masks)."""
    g = torch.Generator().manual_seed(seed)
    real = torch.arange(keys)[None, :] < torch.randint(keys // 2, keys + 1, (rows, 1), generator=g)
    query_slot = torch.arange(keys - queries, keys)[:, None]
    key_slot = torch.arange(keys)[None, :]
    allowed = ((key_slot <= query_slot)[None] & real[:, None, :]) | (key_slot == query_slot)[None]
    return torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf")).unsqueeze(1)


@pytest.mark.parametrize("queries", [70, 1])  # a training forward, and the last query only (`last_only`)
def test_masked_attention_is_sdpa_bitwise_with_gradients(queries: int) -> None:
    g = torch.Generator().manual_seed(0)
    rows, heads, keys = 16, 4, 70
    q0, k0, v0 = (torch.randn(rows, heads, n, d, generator=g) for n, d in ((queries, 24), (keys, 24), (keys, 16)))
    bias, upstream = _bias(rows, queries, keys, seed=1), torch.randn(rows, heads, queries, 16, generator=g)
    results = []
    for attend in (masked_attention, lambda q, k, v, b, scale: F.scaled_dot_product_attention(q, k, v, attn_mask=b,
                                                                                               scale=scale)):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = attend(q, k, v, bias, scale=0.2041)
        out.backward(upstream)
        results.append([out.detach(), q.grad, k.grad, v.grad])
    ours, sdpa = results
    assert [torch.equal(a, b) for a, b in zip(ours, sdpa)] == [True] * 4
    assert torch.isfinite(ours[0]).all()
