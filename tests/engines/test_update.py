"""The local engine's GRPO update: `logp_old` is the policy's log-probs before the rollout's first
optimizer step, for every minibatch, whichever forward computed it (docs/design.md §7)."""

from __future__ import annotations

import torch

from kimi_core.engines.update import LossSpec, build_batch, train_steps
from kimi_core.model import KimiForCausalLM, tiny_config, token_logprobs

VOCAB = 40
SPEC = LossSpec(eps_clip=0.2, eps_clip_high=0.28, eps_clip_c=None, use_tis=False, tis_clip=2.0, kl_loss_coef=0.0,
                use_kl_loss=False, entropy_coef=0.01, per_token_loss=False)


def _samples(groups: int, n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """`groups` prompts of 5-9 tokens, each with `n` responses of 1-8 tokens (uneven on purpose)."""
    g = torch.Generator().manual_seed(seed)
    sequences, prompt_lens = [], []
    for _ in range(groups):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(5, 10, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n):
            response = torch.randint(1, VOCAB, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            sequences.append(prompt + response)
            prompt_lens.append(len(prompt))
    return sequences, prompt_lens


def test_logp_old_is_every_minibatchs_log_probs_before_the_first_step() -> None:
    torch.manual_seed(0)
    model = KimiForCausalLM(tiny_config(vocab_size=VOCAB))
    sequences, prompt_lens = _samples(groups=4, n=3, seed=1)
    with torch.no_grad():
        before, mask, _ = token_logprobs(model, sequences, prompt_lens)  # one forward over all, as miles does
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    batch = build_batch(model, None, sequences=sequences, prompt_lens=prompt_lens, rewards=rewards,
                        n_samples_per_prompt=3, rollout_logprobs=[[0.0] * (len(s) - p) for s, p in
                                                                  zip(sequences, prompt_lens)], num_steps=3)
    assert [m.tolist() for m in batch.minibatches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert torch.equal(batch.mask, mask) and batch.logp_old.shape == before.shape
    # minibatches 1 and 2 now, minibatch 0 by its own loss forward (nothing is updated before it runs)
    assert not batch.logp_old[:4].any()
    torch.testing.assert_close(batch.logp_old[4:], before[4:], rtol=0, atol=1e-6)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    metrics = train_steps(model, optimizer, batch, spec=SPEC, clip_grad=1.0)
    torch.testing.assert_close(batch.logp_old, before, rtol=0, atol=1e-6)
    with torch.no_grad():
        after = token_logprobs(model, sequences, prompt_lens)[0]
    assert (after - before).abs().max() > 1e-3  # the steps moved the policy: a later recompute would differ
    assert metrics["train/ppo_kl"] != 0.0  # steps 1 and 2 ran on an updated policy
