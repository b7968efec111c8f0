"""Sigmoid group-limited router and the routed + shared expert MoE block (DeepSeek-V3 ``noaux_tc``).

HF names: ``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``, ``mlp.experts.{e}.*``,
``mlp.shared_experts.*``.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from kimi_core.model.config import ModelConfig
from kimi_core.model.layers import MLP, FrozenWeight, as_fp32

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
        return self.select(F.linear(as_fp32(x), as_fp32(self.weight)))

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing from fp32 router logits ``x W^T [N,E]`` (the frozen MoE computes them in
        one matmul with its shared expert)."""
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias
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


class _FrozenMoE(NamedTuple):
    """The decode-friendly copies of ``MoE.freeze``: ``front [D, (E) + 2I_s]`` = the router's
    columns (when its weights are fp32, so the fused matmul is the router's own fp32 product) then
    the shared expert's gate|up; ``shared_down [I_s, D]``; the routed experts stacked,
    ``gate_up [E, D, 2I]`` and ``down [E, I, D]``."""

    front: FrozenWeight
    router_in_front: bool
    shared_down: FrozenWeight
    gate_up: torch.Tensor
    down: torch.Tensor


class MoE(nn.Module):
    """Routed experts (top-k of ``n_routed_experts``) plus an always-on shared expert.

    ``y = sum_k w_k * expert_{e_k}(x) + shared(x)``. Two evaluations of the same sum: by default
    a loop over the experts that received tokens (gather their rows with ``index_select``,
    SwiGLU, ``index_add_`` back), through the expert parameters (autograd works). After
    ``freeze()`` (sampling, see ``KimiForCausalLM.frozen_weights``), no-grad calls take the router
    logits and the shared expert's gate|up from one matmul, and add the routed rows into the shared
    expert's output (and into ``residual`` when given: the decoder layer's ``h + ffn`` in the same
    pass). With at most ``BATCHED_MAX_TOKENS`` tokens the routed rows are packed per expert into a
    ``[E, capacity, D]`` block and run through stacked copies of the expert weights with two
    ``bmm``; above it, the loop runs through the experts' own frozen copies.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        self._frozen: _FrozenMoE | None = None

    def forward(self, x: torch.Tensor, *, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., D] -> [..., D]``; plus ``residual`` (same shape) when given."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self._frozen is not None and not torch.is_grad_enabled():
            base = None if residual is None else residual.reshape(flat.shape)
            return self._frozen_forward(flat, self._frozen, base).view(shape)
        weights, expert_ids = self.gate(flat)
        routed = self._routed_loop(flat, weights.to(x.dtype), expert_ids, into=torch.zeros_like(flat))
        shared: torch.Tensor = self.shared_experts(flat)
        out = (routed + shared).view(shape)
        return out if residual is None else residual + out

    @torch.no_grad()
    def freeze(self) -> None:
        """Build the ``_FrozenMoE`` copies (see there)."""
        experts = self._expert_mlps()
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]).t() for e in experts])
        down = torch.stack([e.down_proj.weight.t() for e in experts])
        shared = self.shared_experts
        shared_gate_up = torch.cat([shared.gate_proj.weight, shared.up_proj.weight]).t()
        router_in_front = self.gate.weight.dtype == torch.float32 and shared_gate_up.dtype == torch.float32
        front = torch.cat([self.gate.weight.t(), shared_gate_up], dim=1) if router_in_front else shared_gate_up
        self._frozen = _FrozenMoE(
            FrozenWeight(front), router_in_front, FrozenWeight(shared.down_proj.weight.t()), gate_up, down
        )

    def thaw(self) -> None:
        self._frozen = None

    def _expert_mlps(self) -> list[MLP]:
        """The routed experts with their type (iterating an ``nn.ModuleList`` yields plain modules)."""
        return [cast(MLP, e) for e in self.experts]

    def _routed_loop(
        self, flat: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, *, into: torch.Tensor
    ) -> torch.Tensor:
        """Add each token's weighted routed-expert outputs into ``into [N, D]`` (returned)."""
        top_k = expert_ids.shape[1]
        order = expert_ids.flatten().argsort(stable=True)
        counts = torch.bincount(expert_ids.flatten(), minlength=self.num_experts).tolist()
        token_of_slot = order // top_k
        slot_weights = weights.flatten()[order]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of_slot[start : start + count]
            y = self.experts[expert](flat.index_select(0, tokens))
            into.index_add_(0, tokens, y * slot_weights[start : start + count, None])
            start += count
        return into

    def _frozen_forward(self, flat: torch.Tensor, frozen: _FrozenMoE, residual: torch.Tensor | None) -> torch.Tensor:
        """The shared expert (plus ``residual``), then the routed rows added in."""
        front = frozen.front(flat)
        if frozen.router_in_front:
            logits, shared_gate_up = torch.split(front, [self.num_experts, front.shape[1] - self.num_experts], dim=1)
            weights, expert_ids = self.gate.select(logits)
        else:
            weights, expert_ids = self.gate(flat)
            shared_gate_up = front
        gate, up = shared_gate_up.chunk(2, dim=1)
        hidden = F.silu(gate).mul_(up)
        out = frozen.shared_down(hidden) if residual is None else frozen.shared_down.add_to(residual, hidden)
        weights = weights.to(flat.dtype)
        if flat.shape[0] > BATCHED_MAX_TOKENS:
            return self._routed_loop(flat, weights, expert_ids, into=out)
        num_slots, top_k = expert_ids.numel(), expert_ids.shape[1]
        slot_expert = expert_ids.flatten()
        sorted_expert, order = slot_expert.sort(stable=True)
        counts = torch.bincount(slot_expert, minlength=self.num_experts)
        capacity = int(counts.max())
        rank = torch.arange(num_slots, device=flat.device) - (counts.cumsum(0) - counts)[sorted_expert]
        dest = rank.add_(sorted_expert, alpha=capacity)  # slot in the [E * capacity] packed block
        token = torch.zeros(self.num_experts * capacity, dtype=torch.long, device=flat.device)
        token.index_copy_(0, dest, order // top_k)
        slot_weight = flat.new_zeros(self.num_experts * capacity)  # empty slots weigh 0
        slot_weight.index_copy_(0, dest, weights.flatten()[order])
        packed = flat.index_select(0, token).view(self.num_experts, capacity, -1)
        gate, up = torch.bmm(packed, frozen.gate_up).chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate).mul_(up), frozen.down).mul_(slot_weight.view(self.num_experts, capacity, 1))
        return out.index_add_(0, token, y.view(-1, flat.shape[-1]))
