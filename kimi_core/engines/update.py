"""The GRPO update of the local engine: one rollout's samples -> `num_steps` optimizer steps."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from kimi_core import grpo
from kimi_core.model.sampling import CausalLM, response_mask, token_logprobs


class TrainablePolicy(CausalLM, Protocol):
    """A causal LM whose parameters the optimizer steps (``KimiForCausalLM`` or its QAT view)."""

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


@dataclass
class TrainBatch:
    """Flattened samples of one rollout and its optimizer steps' minibatches. R = longest response;
    tensors are right-padded."""

    sequences: list[list[int]]      # prompt + response ids, one per sample
    prompt_lens: list[int]
    advantages: torch.Tensor        # [B]
    logp_rollout: torch.Tensor      # [B, R] sampler log-probs
    logp_old: torch.Tensor          # [B, R] trainer log-probs before the update (see `build_batch`)
    logp_ref: torch.Tensor | None   # [B, R] reference policy (KL loss only)
    mask: torch.Tensor              # [B, R] 1 on response tokens
    minibatches: list[torch.Tensor]  # sample indices of each optimizer step, in order


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
    num_steps: int,
) -> TrainBatch:
    """Advantages per group, the `num_steps` consecutive minibatches, and `logp_old` (miles: the
    trainer's log-probs before the update, not the sampler's).

    `logp_old` is computed minibatch by minibatch, and the first minibatch's rows are left for its
    own loss forward to fill (`grpo_loss`: the policy is not updated yet when it runs, so its
    log-probs are that minibatch's before-update log-probs). One no-grad forward fewer per rollout,
    and no forward over the whole rollout padded to its longest sample."""
    minibatches = list(torch.arange(len(sequences)).chunk(num_steps))
    mask = response_mask(sequences, prompt_lens).float()
    width = mask.shape[1]
    logp_old = torch.zeros(len(sequences), width)
    with torch.no_grad():
        for idx in minibatches[1:]:
            part, _, _ = token_logprobs(policy, [sequences[i] for i in idx], [prompt_lens[i] for i in idx])
            logp_old[idx, : part.shape[1]] = part
        logp_ref = token_logprobs(reference, sequences, prompt_lens)[0] if reference is not None else None
    advantages = grpo.group_advantages(rewards, n_samples_per_prompt=n_samples_per_prompt).reshape(-1)
    return TrainBatch(
        sequences=sequences, prompt_lens=prompt_lens, advantages=advantages, logp_rollout=_pad(rollout_logprobs, width),
        logp_old=logp_old, logp_ref=logp_ref, mask=mask, minibatches=minibatches,
    )


def grpo_loss(policy: CausalLM, batch: TrainBatch, step: int, spec: LossSpec) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of minibatch `step` and its statistics (docs/design.md §7). Step 0 runs before any
    update, so its forward's log-probs are also its `logp_old` (`build_batch` leaves them to it)."""
    idx = batch.minibatches[step]
    seqs = [batch.sequences[i] for i in idx.tolist()]
    lens = [batch.prompt_lens[i] for i in idx.tolist()]
    logp, mask, entropy = token_logprobs(policy, seqs, lens, with_entropy=spec.entropy_coef > 0)
    width = mask.shape[1]
    if step == 0:
        batch.logp_old[idx, :width] = logp.detach()
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
    spec: LossSpec,
    clip_grad: float,
) -> dict[str, float]:
    """One optimizer step per minibatch of `batch`, in order."""
    history: dict[str, list[float]] = {}
    for step in range(len(batch.minibatches)):
        optimizer.zero_grad(set_to_none=True)
        loss, stats = grpo_loss(policy, batch, step, spec)
        torch.autograd.backward(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), clip_grad)
        optimizer.step()
        stats["train/grad_norm"] = float(grad_norm)
        for key, value in stats.items():
            history.setdefault(key, []).append(value)
    metrics = {key: sum(values) / len(values) for key, values in history.items()}
    metrics["train/lr"] = optimizer.param_groups[0]["lr"]
    return metrics
