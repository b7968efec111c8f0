"""GRPO math as pure functions on tensors (the miles semantics, docs/design.md §7).

Shapes: G prompt groups, n samples per prompt, B = G*n sequences, T response tokens.
Per-token tensors are [B, T] with a {0,1} loss mask of the same shape.
"""

from __future__ import annotations

import math

import torch

LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0
NONZERO_STD_THRESHOLD = 1e-8


def group_advantages(rewards: torch.Tensor, *, n_samples_per_prompt: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO group-normalised advantages, one scalar per sample.

    `A_i = (r_i - mean_g) / (std_g + eps)` with the unbiased std (N-1) of the sample's group;
    when a group has one sample or its std is 0 there is no division: `A_i = r_i - mean_g`.
    `rewards`: [G*n] or [G, n]; returns the same shape, float. Broadcasting the advantage to
    every response token is the caller's job.
    """
    if n_samples_per_prompt < 1:
        raise ValueError(f"n_samples_per_prompt must be >= 1, got {n_samples_per_prompt}")
    if rewards.numel() % n_samples_per_prompt != 0:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of n_samples_per_prompt={n_samples_per_prompt}"
        )
    grouped = rewards.reshape(-1, n_samples_per_prompt).to(torch.float64)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if n_samples_per_prompt == 1:
        return centered.reshape(rewards.shape).to(_float_dtype(rewards))
    std = grouped.std(dim=1, unbiased=True, keepdim=True)
    scaled = torch.where(std > 0, centered / (std + eps), centered)
    return scaled.reshape(rewards.shape).to(_float_dtype(rewards))


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (asymmetric clip, optional dual clip), per token.

    `rho = exp(clamp(logp - logp_old, -20, 20))`,
    `loss = max(-rho*A, -clip(rho, 1-eps_clip, 1+eps_clip_high)*A)`;
    dual clip (`eps_clip_c = c > 1`): for tokens with `A < 0`, `loss = min(loss, -c*A)`.
    All inputs [B, T] (advantages may be [B, 1] or [B] and broadcast). Returns
    `(loss [B, T], clipfrac [])`, where clipfrac is the masked token fraction whose clipped
    term was the active one (aggregated like miles: token mean per sequence, mean over sequences).
    """
    if eps_clip_c is not None and eps_clip_c <= 1.0:
        raise ValueError(f"eps_clip_c must be > 1 for the dual clip, got {eps_clip_c}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(torch.clamp(logp - logp_old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1.0 - eps_clip, 1.0 + eps_clip_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    clipped_active = (clipped > unclipped).to(logp.dtype)
    if eps_clip_c is not None:
        dual = torch.minimum(loss, -eps_clip_c * advantages)
        loss = torch.where(advantages < 0, dual, loss)
    clipfrac = aggregate(clipped_active, mask, per_token_loss=False).detach()
    return loss, clipfrac


def tis_weights(logp_old: torch.Tensor, logp_rollout: torch.Tensor, *, clip: float = 2.0) -> torch.Tensor:
    """Truncated importance sampling weights for the train/rollout mismatch, detached.

    `w = clamp(exp(logp_old - logp_rollout), 0, clip)`; shapes [B, T] -> [B, T].
    """
    return torch.clamp(torch.exp(logp_old - logp_rollout), 0.0, clip).detach()


def low_var_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Low-variance KL estimator (k3) against the reference policy, per token.

    `d = clamp(logp_ref - logp, -20, 20)`, `kl = clamp(exp(d) - 1 - d, -10, 10)`; [B, T] -> [B, T].
    """
    d = torch.clamp(logp_ref - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.clamp(torch.exp(d) - 1.0 - d, -KL_CLAMP, KL_CLAMP)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, *, per_token_loss: bool) -> torch.Tensor:
    """Reduce a [B, T] per-token quantity to a scalar over the masked tokens.

    Default (`per_token_loss=False`): `mean_b( sum_t m*x / max(sum_t m, 1) )` — token mean
    within each sequence, then mean over sequences; a sequence with an empty mask contributes 0.
    `per_token_loss=True`: `sum_{b,t} m*x / max(sum m, 1)`. Never NaN for empty masks
    (masked-out entries are zeroed with `where`, so NaN/inf there do not leak).
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token shape {tuple(per_token.shape)} != mask shape {tuple(mask.shape)}")
    m = mask.to(per_token.dtype)
    masked = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    if per_token_loss:
        return masked.sum() / m.sum().clamp(min=1.0)
    per_sequence = masked.sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)
    return per_sequence.mean() if per_sequence.numel() else per_sequence.sum()


def nonzero_std_filter(rewards: torch.Tensor) -> torch.Tensor:
    """Dynamic-sampling filter: keep a prompt group iff the std of its rewards > 1e-8.

    `rewards` [G, n] -> bool [G]. Uses the population std (any spread > 0 is kept; a group of
    one sample has std 0 and is dropped).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [G, n], got shape {tuple(rewards.shape)}")
    std = rewards.to(torch.float64).std(dim=1, unbiased=False)
    return std > NONZERO_STD_THRESHOLD


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: `1 - C(n-c, k) / C(n, k)`.

    Requires `0 <= c <= n` and `1 <= k <= n`; returns 1.0 when `n - c < k`.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
