"""The GRPO update of the local engine: one rollout's samples -> `num_steps` optimizer steps."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from kimi_core import grpo
from kimi_core.model.sampling import CausalLM, token_logprobs


class TrainablePolicy(CausalLM, Protocol):
    """A causal LM whose parameters the optimizer steps (``KimiForCausalLM`` or its QAT view)."""

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


@dataclass
class TrainBatch:
    """Flattened samples of one rollout. R = longest response; tensors are right-padded."""

    sequences: list[list[int]]      # prompt + response ids, one per sample
    prompt_lens: list[int]
    advantages: torch.Tensor        # [B]
    logp_rollout: torch.Tensor      # [B, R] sampler log-probs
    logp_old: torch.Tensor          # [B, R] trainer recompute before the update
    logp_ref: torch.Tensor | None   # [B, R] reference policy (KL loss only)
    mask: torch.Tensor              # [B, R] 1 on response tokens


@dataclass(frozen=True)
class LossSpec:
    """The GRPO objective's scalars (from the recipe's grpo section)."""

    eps_clip: float
    eps_clip_high: float
    eps_clip_c: float | None
    use_tis: bool
    tis_clip: float
    kl_loss_coef: float
    use_kl_loss: bool
    entropy_coef: float
    per_token_loss: bool


def _pad(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def build_batch(
    policy: CausalLM,
    reference: CausalLM | None,
    *,
    sequences: list[list[int]],
    prompt_lens: list[int],
    rewards: torch.Tensor,
    n_samples_per_prompt: int,
    rollout_logprobs: list[list[float]],
) -> TrainBatch:
    """Advantages per group and the `logp_old` recompute (miles: trainer log-probs, not the sampler's)."""
    with torch.no_grad():
        logp_old, mask, _ = token_logprobs(policy, sequences, prompt_lens)
        logp_ref = token_logprobs(reference, sequences, prompt_lens)[0] if reference is not None else None
    advantages = grpo.group_advantages(rewards, n_samples_per_prompt=n_samples_per_prompt).reshape(-1)
    return TrainBatch(
        sequences=sequences, prompt_lens=prompt_lens, advantages=advantages,
        logp_rollout=_pad(rollout_logprobs, mask.shape[1]), logp_old=logp_old, logp_ref=logp_ref, mask=mask,
    )


def grpo_loss(policy: CausalLM, batch: TrainBatch, idx: torch.Tensor, spec: LossSpec) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of samples `idx` and its statistics (docs/design.md §7)."""
    seqs = [batch.sequences[i] for i in idx.tolist()]
    lens = [batch.prompt_lens[i] for i in idx.tolist()]
    logp, mask, entropy = token_logprobs(policy, seqs, lens, with_entropy=spec.entropy_coef > 0)
    width = mask.shape[1]
    old = batch.logp_old[idx, :width]
    adv = batch.advantages[idx].unsqueeze(1).expand_as(logp)
    per_token, clipfrac = grpo.policy_loss(
        logp, old, adv, mask, eps_clip=spec.eps_clip, eps_clip_high=spec.eps_clip_high, eps_clip_c=spec.eps_clip_c
    )
    if spec.use_tis:
        per_token = per_token * grpo.tis_weights(old, batch.logp_rollout[idx, :width], clip=spec.tis_clip)

    def agg(values: torch.Tensor) -> torch.Tensor:
        return grpo.aggregate(values, mask, per_token_loss=spec.per_token_loss)

    pg_loss = agg(per_token)
    loss = pg_loss
    stats = {"train/pg_loss": pg_loss.item(), "train/pg_clipfrac": float(clipfrac),
             "train/ppo_kl": agg(old - logp.detach()).item()}
    if entropy is not None:
        entropy_loss = agg(entropy)
        loss = loss - spec.entropy_coef * entropy_loss
        stats["train/entropy_loss"] = entropy_loss.item()
    if spec.use_kl_loss and batch.logp_ref is not None:
        kl = agg(grpo.low_var_kl(logp, batch.logp_ref[idx, :width]))
        loss = loss + spec.kl_loss_coef * kl
        stats["train/kl_loss"] = kl.item()
    return loss, stats


def train_steps(
    policy: TrainablePolicy,
    optimizer: torch.optim.Optimizer,
    batch: TrainBatch,
    *,
    num_steps: int,
    spec: LossSpec,
    clip_grad: float,
) -> dict[str, float]:
    """Split the rollout into `num_steps` consecutive minibatches, one optimizer step each."""
    total = len(batch.sequences)
    history: dict[str, list[float]] = {}
    for chunk in torch.arange(total).chunk(num_steps):
        optimizer.zero_grad(set_to_none=True)
        loss, stats = grpo_loss(policy, batch, chunk, spec)
        torch.autograd.backward(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), clip_grad)
        optimizer.step()
        stats["train/grad_norm"] = float(grad_norm)
        for key, value in stats.items():
            history.setdefault(key, []).append(value)
    metrics = {key: sum(values) / len(values) for key, values in history.items()}
    metrics["train/lr"] = optimizer.param_groups[0]["lr"]
    return metrics
