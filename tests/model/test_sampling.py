"""generate / token_logprobs: determinism, stop handling, greedy vs full forward, log-prob agreement."""

from __future__ import annotations

import pytest
import torch

from kimi_core.model import generate, token_logprobs
from kimi_core.model.sampling import exponential_like

PAD = 0
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [20]]


def run(model, *, seed: int, prompts=PROMPTS, **kwargs):
    args = dict(max_new_tokens=12, temperature=1.0, top_p=1.0, stop_token_ids=[], pad_token_id=PAD)
    args.update(kwargs)
    return generate(model, prompts, generator=torch.Generator().manual_seed(seed), **args)


def test_same_seed_same_output_different_seed_differs(make_model) -> None:
    model, _ = make_model(seed=0)
    a, b, c = run(model, seed=1), run(model, seed=1), run(model, seed=2)
    assert a == b
    assert a.tokens != c.tokens
    assert all(len(t) == 12 for t in a.tokens) and a.truncated == [True] * 4


def test_stop_token_ends_row_and_is_included(make_model) -> None:
    model, cfg = make_model(seed=0)
    free = run(model, seed=3, max_new_tokens=16)
    stop = free.tokens[1][4]  # a token row 1 samples at step 5
    out = run(model, seed=3, max_new_tokens=16, stop_token_ids={stop})
    for row, toks in enumerate(out.tokens):
        if stop in toks:
            assert toks[-1] == stop and toks.count(stop) == 1 and not out.truncated[row]
        else:
            assert len(toks) == 16 and out.truncated[row]
        assert len(out.logprobs[row]) == len(toks)
    assert out.tokens[1] == free.tokens[1][: free.tokens[1].index(stop) + 1]


def test_greedy_equals_argmax_of_full_forward(make_model) -> None:
    model, _ = make_model(seed=4)
    out = run(model, seed=0, temperature=0.0, max_new_tokens=10)
    for prompt, response in zip(PROMPTS, out.tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response]))[0]
        expected = logits[len(prompt) - 1 : -1].argmax(dim=-1).tolist()
        assert response == expected
    assert out == run(model, seed=99, temperature=0.0, max_new_tokens=10)  # seed-independent


def test_tiny_top_p_is_greedy(make_model) -> None:
    model, _ = make_model(seed=4)
    greedy = run(model, seed=0, temperature=0.0, max_new_tokens=8)
    nucleus = run(model, seed=5, temperature=0.7, top_p=1e-6, max_new_tokens=8)
    assert nucleus.tokens == greedy.tokens


def test_generate_logprobs_match_recompute(make_model) -> None:
    model, _ = make_model(seed=7)
    out = run(model, seed=11, max_new_tokens=10, stop_token_ids=[3, 4])
    sequences = [p + r for p, r in zip(PROMPTS, out.tokens)]
    logp, mask, entropy = token_logprobs(model, sequences, [len(p) for p in PROMPTS], with_entropy=True)
    assert mask.sum(dim=1).tolist() == [len(r) for r in out.tokens]
    for row, lps in enumerate(out.logprobs):
        assert torch.allclose(logp[row, : len(lps)], torch.tensor(lps), atol=1e-5, rtol=0)
        assert torch.all(logp[row, len(lps) :] == 0)
    assert entropy is not None and torch.all(entropy[mask.bool()] > 0)


def test_token_logprobs_is_differentiable_and_temperature_scaled(make_model) -> None:
    model, _ = make_model(seed=8)
    sequences, prompt_lens = [[1, 2, 3, 4, 5], [6, 7, 8]], [2, 2]
    logp, mask, entropy = token_logprobs(model, sequences, prompt_lens)
    assert logp.shape == mask.shape == (2, 3) and entropy is None
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    (logp * mask).sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        logits = model(torch.tensor([sequences[0]]))[0]
        hot, _, _ = token_logprobs(model, sequences, prompt_lens, temperature=2.0)
    expected = torch.log_softmax(logits[1:4] / 2.0, dim=-1).gather(1, torch.tensor([[3], [4], [5]]))[:, 0]
    assert torch.allclose(hot[0], expected, atol=1e-6)


def test_bad_arguments_are_rejected(make_model) -> None:
    model, _ = make_model(seed=0)
    with pytest.raises(ValueError, match="top_p"):
        run(model, seed=0, top_p=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        run(model, seed=0, prompts=[[1], []])
    with pytest.raises(ValueError, match="prompt_len=0"):
        token_logprobs(model, [[1, 2]], [0])
    empty = run(model, seed=0, max_new_tokens=0)
    assert empty.tokens == [[], [], [], []] and empty.truncated == [True] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exponential_like_equals_exponential_bit_for_bit(dtype: torch.dtype) -> None:
    """The sampler's Exp(1) draws are ATen's ``exponential_`` numbers, and leave the generator in
    the same state (the samples and the engine's bitwise resume depend on both)."""
    for seed, shape in ((0, (1024, 301)), (1, (32, 300)), (2, (7, 97)), (3, (3,))):
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(3):
            fast = exponential_like(torch.empty(shape, dtype=dtype), ours)
            assert fast.dtype == dtype and fast.shape == shape
            assert torch.equal(fast, torch.empty(shape, dtype=dtype).exponential_(generator=theirs))
        assert torch.equal(ours.get_state(), theirs.get_state())
