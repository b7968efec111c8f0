"""Sigmoid group-limited router and the routed + shared expert MoE block (DeepSeek-V3 ``noaux_tc``).

HF names: ``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``, ``mlp.experts.{e}.*``,
``mlp.shared_experts.*``.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from kimi_core.model.config import ModelConfig
from kimi_core.model.layers import MLP, as_fp32

BATCHED_MAX_TOKENS = 512  # above this, packing to a padded [E, capacity, D] block wastes more than it saves


class Router(nn.Module):
    """Sigmoid, bias-corrected, group-limited top-k router (DeepSeek-V3 ``noaux_tc``).

    ``s = sigmoid(x W^T)`` in fp32. Choice uses ``s + e_score_correction_bias``: groups ranked by
    the sum of their top-2 biased scores, the best ``topk_group`` groups kept, then top-k experts.
    Weights use the unbiased ``s`` of the chosen experts, divided by their sum when
    ``norm_topk_prob``, times ``routed_scaling_factor``.
    """

    e_score_correction_bias: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N,D] -> (weights [N,k] fp32, expert ids [N,k])``."""
        scores = F.linear(as_fp32(x), as_fp32(self.weight)).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1 and self.topk_group < self.n_group:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, self.num_experts)
        expert_ids = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, expert_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, expert_ids


class MoE(nn.Module):
    """Routed experts (top-k of ``n_routed_experts``) plus an always-on shared expert.

    ``y = sum_k w_k * expert_{e_k}(x) + shared(x)``. Two evaluations of the same sum: by default
    a loop over the experts that received tokens (gather their rows with ``index_select``,
    SwiGLU, ``index_add_`` back), through the expert parameters (autograd works). After
    ``freeze()`` (decoding, see ``KimiForCausalLM.frozen_weights``), no-grad calls with at most
    ``BATCHED_MAX_TOKENS`` tokens pack the routed rows per expert into a ``[E, capacity, D]``
    block and run it through stacked copies of the expert weights with two ``bmm``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        self._frozen: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, expert_ids = self.gate(flat)
        if weights.dtype != x.dtype:
            weights = weights.to(x.dtype)
        batched = self._frozen is not None and not torch.is_grad_enabled() and flat.shape[0] <= BATCHED_MAX_TOKENS
        if batched:
            routed = self._routed_batched(flat, weights, expert_ids)
        else:
            routed = self._routed_loop(flat, weights, expert_ids)
        shared: torch.Tensor = self.shared_experts(flat)
        return (routed + shared).view(shape)

    @torch.no_grad()
    def freeze(self) -> None:
        """Stack the experts: ``gate_up [E, D, 2I]`` (gate columns, then up) and ``down [E, I, D]``."""
        experts = self._expert_mlps()
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]).t() for e in experts])
        down = torch.stack([e.down_proj.weight.t() for e in experts])
        self._frozen = (gate_up, down)

    def thaw(self) -> None:
        self._frozen = None

    def _expert_mlps(self) -> list[MLP]:
        """The routed experts with their type (iterating an ``nn.ModuleList`` yields plain modules)."""
        return [cast(MLP, e) for e in self.experts]

    def _routed_loop(self, flat: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        top_k = expert_ids.shape[1]
        order = expert_ids.flatten().argsort(stable=True)
        counts = torch.bincount(expert_ids.flatten(), minlength=self.num_experts).tolist()
        token_of_slot = order // top_k
        slot_weights = weights.flatten()[order]
        out = torch.zeros_like(flat)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of_slot[start : start + count]
            y = self.experts[expert](flat.index_select(0, tokens))
            out.index_add_(0, tokens, y * slot_weights[start : start + count, None])
            start += count
        return out

    def _routed_batched(self, flat: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        num_slots, top_k = expert_ids.numel(), expert_ids.shape[1]
        slot_expert = expert_ids.flatten()
        order = slot_expert.argsort(stable=True)
        counts = torch.bincount(slot_expert, minlength=self.num_experts)
        capacity = int(counts.max())
        sorted_expert = slot_expert[order]
        rank = torch.arange(num_slots, device=flat.device) - (counts.cumsum(0) - counts)[sorted_expert]
        dest = sorted_expert * capacity + rank  # slot in the [E * capacity] packed block
        token = torch.zeros(self.num_experts * capacity, dtype=torch.long, device=flat.device)
        token[dest] = order // top_k
        slot_weight = flat.new_zeros(self.num_experts * capacity)  # empty slots weigh 0
        slot_weight[dest] = weights.flatten()[order]
        assert self._frozen is not None
        gate_up, down = self._frozen
        packed = flat.index_select(0, token).view(self.num_experts, capacity, -1)
        gate, up = torch.bmm(packed, gate_up).chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, down) * slot_weight.view(self.num_experts, capacity, 1)
        return torch.zeros_like(flat).index_add_(0, token, y.view(-1, flat.shape[-1]))
