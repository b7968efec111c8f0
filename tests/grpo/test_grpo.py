"""GRPO math: hand-worked 3-6 element cases and the edge cases (docs/design.md §7)."""

from __future__ import annotations

import math

import pytest
import torch

from kimi_core import grpo


def close(actual: torch.Tensor, expected: list[float] | float, tol: float = 1e-4) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=0)


def test_group_advantages_hand_worked() -> None:
    # [1,0,0,1]: mean 0.5, unbiased std sqrt(4*0.25/3)=0.57735 -> A = ±0.5/0.57735 = ±0.8660
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), n_samples_per_prompt=4)
    close(adv, [0.8660, -0.8660, -0.8660, 0.8660])


def test_group_advantages_two_groups_2d() -> None:
    # group 1 [1,0,0]: mean 1/3, std sqrt((4/9+1/9+1/9)/2)=0.57735 -> [1.1547, -0.5774, -0.5774]
    # group 2 [1,1,1]: std 0 -> no division -> zeros
    adv = grpo.group_advantages(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), n_samples_per_prompt=3)
    assert adv.shape == (2, 3)
    close(adv, [[1.1547, -0.5774, -0.5774], [0.0, 0.0, 0.0]])


def test_group_advantages_all_equal_nonzero_is_centered_only() -> None:
    # [0.5,0.5,0.5]: r - mean = 0 exactly, no 1e-6 division
    adv = grpo.group_advantages(torch.tensor([0.5, 0.5, 0.5]), n_samples_per_prompt=3)
    assert torch.equal(adv, torch.zeros(3))


def test_group_advantages_one_sample_per_group() -> None:
    # each group is its own mean -> 0, never NaN (std of one sample is undefined)
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 3.0]), n_samples_per_prompt=1)
    assert torch.equal(adv, torch.zeros(3))


def test_group_advantages_integer_rewards_and_bad_group_size() -> None:
    adv = grpo.group_advantages(torch.tensor([1, 0]), n_samples_per_prompt=2)
    # mean .5, std sqrt(0.5)=0.7071 -> ±0.7071
    close(adv, [0.7071, -0.7071])
    with pytest.raises(ValueError, match="groups of n_samples_per_prompt=3"):
        grpo.group_advantages(torch.ones(4), n_samples_per_prompt=3)


def _logp_pair(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.zeros(1, len(ratios))
    return torch.log(torch.tensor([ratios])), old


def test_policy_loss_clip_both_sides() -> None:
    # eps 0.2 / eps_high 0.28; clip range [0.8, 1.28]
    # rho=1.5,A=+1: max(-1.5, -1.28) = -1.28 (clipped active)
    # rho=0.5,A=+1: max(-0.5, -0.8)  = -0.5  (unclipped)
    # rho=0.5,A=-1: max(0.5, 0.8)    = 0.8   (clipped active)
    # rho=1.5,A=-1: max(1.5, 1.28)   = 1.5   (unclipped)
    # rho=1.0,A=+2: -2.0 (inside the range)
    logp, old = _logp_pair([1.5, 0.5, 0.5, 1.5, 1.0])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0]])
    mask = torch.ones(1, 5)
    loss, clipfrac = grpo.policy_loss(logp, old, adv, mask, eps_clip=0.2, eps_clip_high=0.28)
    close(loss, [[-1.28, -0.5, 0.8, 1.5, -2.0]])
    close(clipfrac, 2 / 5)


def test_policy_loss_dual_clip_caps_negative_advantages() -> None:
    # c=3: rho=5,A=-1: max(5, 1.28)=5 -> min(5, 3)=3; rho=5,A=+1: -1.28 (dual clip ignores A>0)
    # rho=2,A=-1: max(2,1.28)=2 -> min(2,3)=2
    logp, old = _logp_pair([5.0, 5.0, 2.0])
    adv = torch.tensor([[-1.0, 1.0, -1.0]])
    loss, _ = grpo.policy_loss(logp, old, adv, torch.ones(1, 3), eps_clip=0.2, eps_clip_high=0.28, eps_clip_c=3.0)
    close(loss, [[3.0, -1.28, 2.0]])
    with pytest.raises(ValueError, match="eps_clip_c"):
        grpo.policy_loss(logp, old, adv, torch.ones(1, 3), eps_clip=0.2, eps_clip_high=0.28, eps_clip_c=1.0)


def test_policy_loss_log_ratio_is_clamped_and_gradient_flows() -> None:
    logp = torch.tensor([[100.0, 0.1]], requires_grad=True)
    old = torch.zeros(1, 2)
    loss, _ = grpo.policy_loss(logp, old, torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2), eps_clip=0.2, eps_clip_high=0.28)
    assert math.isclose(loss[0, 0].item(), math.exp(20), rel_tol=1e-5)
    loss[0, 1].backward()
    # rho=e^0.1=1.105 inside the clip range, d(-rho*A)/dlogp = -rho
    assert math.isclose(logp.grad[0, 1].item(), -math.exp(0.1), rel_tol=1e-5)


def test_tis_weights_clamped_and_detached() -> None:
    # exp(0)=1, exp(ln 3)=3 -> 2 (clip), exp(ln .5)=.5
    old = torch.tensor([0.0, math.log(3.0), math.log(0.5)], requires_grad=True)
    w = grpo.tis_weights(old, torch.zeros(3))
    close(w, [1.0, 2.0, 0.5])
    assert not w.requires_grad


def test_low_var_kl_hand_worked() -> None:
    # d = ref - logp: 0 -> 0; ln2 -> 2-1-0.6931=0.3069; -ln2 -> 0.5-1+0.6931=0.1931; d=30->clamp 20 -> 10
    logp = torch.tensor([0.0, 0.0, 0.0, 0.0])
    ref = torch.tensor([0.0, math.log(2.0), -math.log(2.0), 30.0])
    close(grpo.low_var_kl(logp, ref), [0.0, 0.3069, 0.1931, 10.0])


def test_aggregate_sequence_mean_vs_token_mean() -> None:
    # seq 0 tokens [1,2,3] (all masked in) -> 2; seq 1 [4, x, x] (one token) -> 4
    # sequence mean: (2+4)/2 = 3; per-token: (1+2+3+4)/4 = 2.5
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(grpo.aggregate(x, mask, per_token_loss=False), 3.0)
    close(grpo.aggregate(x, mask, per_token_loss=True), 2.5)


def test_aggregate_empty_mask_row_contributes_zero_no_nan() -> None:
    # seq 0 mean 2, seq 1 empty -> 0: (2+0)/2 = 1
    x = torch.tensor([[2.0, 2.0], [float("nan"), 7.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    close(grpo.aggregate(x, mask, per_token_loss=False), 1.0)
    assert grpo.aggregate(x, torch.zeros(2, 2), per_token_loss=True).item() == 0.0
    assert grpo.aggregate(x, torch.zeros(2, 2), per_token_loss=False).item() == 0.0
    with pytest.raises(ValueError, match="mask shape"):
        grpo.aggregate(x, torch.ones(2, 3), per_token_loss=True)


def test_aggregate_gradient_is_finite_with_nan_in_masked_slots() -> None:
    x = torch.tensor([[1.0, float("nan")]], requires_grad=True)
    grpo.aggregate(x, torch.tensor([[1, 0]]), per_token_loss=False).backward()
    assert torch.equal(x.grad, torch.tensor([[1.0, 0.0]]))


def test_nonzero_std_filter() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert grpo.nonzero_std_filter(rewards).tolist() == [True, False, False, True]
    assert grpo.nonzero_std_filter(torch.tensor([[1.0], [0.0]])).tolist() == [False, False]


def test_pass_at_k() -> None:
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert grpo.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # k=1 is the fraction correct: 1 - C(3,1)/C(4,1) = 1/4
    assert grpo.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert grpo.pass_at_k(4, 0, 4) == 0.0
    assert grpo.pass_at_k(4, 3, 2) == 1.0  # n-c < k
    with pytest.raises(ValueError, match="n=2 c=3"):
        grpo.pass_at_k(2, 3, 1)


def test_policy_loss_per_sequence_advantages_broadcast() -> None:
    # A [B]=[1,-1] broadcasts over T; rho=1 everywhere -> loss = -A per token
    loss, clipfrac = grpo.policy_loss(
        torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.ones(2, 3), eps_clip=0.2, eps_clip_high=0.28
    )
    close(loss, [[-1.0] * 3, [1.0] * 3])
    close(clipfrac, 0.0)
