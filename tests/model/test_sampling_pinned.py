"""Pinned samples: ``generate`` must keep drawing exactly these tokens for these seeds.

The literals were recorded before the sampler's speed work; any change to the sampler, the
decode path or the model's arithmetic that flips a token, or that consumes the generator
differently (the engine's bitwise resume depends on it), fails here. Log-probs are pinned by
their per-row sums (rounded), and the generator's state after the call by its next draw.
"""

from __future__ import annotations

import pytest
import torch

from kimi_core.model import KimiForCausalLM, generate, tiny_config
from tests.model.conftest import randomize

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [20]]

CASES = {
    "t1": dict(temperature=1.0, top_p=1.0, stop_token_ids=[]),
    "greedy": dict(temperature=0.0, top_p=1.0, stop_token_ids=[]),
    "nucleus_stop": dict(temperature=0.8, top_p=0.9, stop_token_ids=[3, 4, 30]),
}

# name: (tokens, truncated, per-row sum of log-probs, the generator's next randint(0, 2**31))
PINNED = {
    "t1": (
        [[11, 26, 89, 15, 76, 39, 70, 66, 61, 40], [3, 94, 93, 50, 63, 54, 62, 10, 31, 25],
         [1, 13, 69, 46, 32, 41, 19, 15, 16, 68], [83, 23, 92, 43, 73, 92, 71, 44, 90, 92]],
        [True, True, True, True], [-41.5244, -41.4625, -44.0296, -39.6512], 1721586972,
    ),
    "greedy": (
        [[2, 77, 23, 31, 92, 64, 86, 10, 25, 55], [3, 24, 24, 67, 67, 30, 86, 55, 40, 38],
         [35, 35, 35, 35, 35, 71, 35, 35, 35, 35], [19, 77, 72, 88, 83, 77, 76, 19, 96, 77]],
        [True, True, True, True], [-29.6213, -28.457, -28.0601, -30.1516], 2137449171,
    ),
    "nucleus_stop": (
        [[90, 43, 42, 26, 72, 0, 52, 51, 21, 46], [59, 56, 67, 58, 83, 1, 93, 30],
         [49, 41, 79, 95, 71, 16, 30], [88, 24, 95, 63, 71, 21, 46, 28, 37, 1]],
        [True, False, False, True], [-42.9714, -30.7989, -28.391, -39.0103], 354222541,
    ),
}

# GRPO groups: PROMPTS[:3], each 3 times in a row; recorded while every row was still prefilled
# on its own, so the shared prefill (one per distinct prompt) must reproduce them.
GROUPS = [p for p in PROMPTS[:3] for _ in range(3)]
PINNED_GROUPS = {
    "t1": (
        [[17, 64, 34, 78, 43, 26, 44, 81], [83, 77, 64, 2, 63, 89, 45, 49], [22, 89, 83, 83, 43, 6, 51, 30],
         [78, 3, 72, 61, 46, 50, 43, 50], [27, 18, 70, 53, 65, 62, 21, 24], [39, 93, 77, 33, 85, 21, 61, 24],
         [87, 11, 50, 88, 87, 19, 50, 30], [8, 96, 74, 8, 76, 31, 82, 1], [1, 49, 58, 76, 87, 1, 89, 29]],
        [-36.8632, -36.0183, -35.7695, -32.8234, -32.901, -35.6636, -38.0212, -35.3321, -31.1831], 120433841,
    ),
    "nucleus_stop": (  # row 5 stops at once: the repeated cache rows are then compacted
        [[61, 93, 72, 55, 12, 25, 72, 88], [80, 45, 62, 5, 92, 83, 0, 7], [56, 73, 46, 23, 20, 51, 61, 20],
         [51, 46, 6, 67, 46, 16, 47, 62], [54, 42, 71, 21, 37, 38, 54, 72], [3], [94, 71, 81, 62, 51, 63, 62, 37],
         [56, 76, 71, 38, 16, 59, 81, 86], [49, 1, 81, 35, 63, 62, 59, 13]],
        [-27.4101, -32.5625, -28.9684, -29.1143, -29.0304, -2.6294, -33.5835, -29.0051, -29.0773], 1406630730,
    ),
}

BIG_TOKENS = [
    [109, 66, 12, 280, 72, 127, 246, 251, 274, 233, 119, 41, 73, 79, 181, 154],
    [20, 126, 229, 102, 126, 255, 277, 155, 167, 150, 138, 218, 212, 132, 69, 45],
    [14, 159, 126, 130, 188, 284, 270, 284, 35, 91, 277, 126, 175, 189, 16, 105],
    [175, 30, 126, 188, 21, 177, 7],
    [174, 233, 215, 88, 190, 183, 209, 211, 131, 146, 158, 218, 176, 136, 264, 159],
    [4, 108, 280, 269, 17, 235, 298, 36, 275, 238, 130, 189, 161, 208, 125, 91],
    [133, 122, 117, 297, 298, 3, 105, 291, 201, 111, 264, 266, 203, 8],
    [91, 39, 15, 25, 273, 206, 127, 294, 162, 64, 35, 185, 35, 41, 260, 189],
    [85, 140, 205, 57, 251, 4, 118, 36, 132, 208, 25, 76, 212, 117, 149, 283],
    [158, 230, 223, 201, 163, 16, 282, 148, 82, 174, 245, 126, 84, 84, 32, 193],
    [225, 67, 214, 148, 50, 29, 132, 64, 298, 141, 53, 107, 225, 174, 26, 281],
    [282, 124, 13, 27, 114, 260, 233, 108, 141, 258, 65, 206, 77, 280, 15, 151],
]
BIG_LOGP_SUMS = [-80.936, -88.3773, -79.7687, -33.2425, -84.1786, -78.3857, -66.5788, -71.6415, -79.2856,
                 -84.1945, -82.1051, -81.0043]


@pytest.fixture(scope="module")
def small_model() -> KimiForCausalLM:
    return randomize(KimiForCausalLM(tiny_config(vocab_size=97)), seed=21)


@pytest.mark.parametrize("name", sorted(CASES))
def test_generate_pinned_sequences(small_model: KimiForCausalLM, name: str) -> None:
    tokens, truncated, logp_sums, next_draw = PINNED[name]
    g = torch.Generator().manual_seed(1234)
    out = generate(small_model, PROMPTS, max_new_tokens=10, pad_token_id=0, generator=g, **CASES[name])
    assert out.tokens == tokens
    assert out.truncated == truncated
    assert [sum(r) for r in out.logprobs] == pytest.approx(logp_sums, abs=2e-4)
    assert torch.randint(0, 2**31, (1,), generator=g).item() == next_draw


@pytest.mark.parametrize("name", sorted(PINNED_GROUPS))
def test_generate_pinned_groups_prefill_each_prompt_once(small_model: KimiForCausalLM, name: str) -> None:
    tokens, logp_sums, next_draw = PINNED_GROUPS[name]
    prefill_rows: list[int] = []
    hook = small_model.register_forward_pre_hook(lambda _, args: prefill_rows.append(args[0].shape[0]))
    try:
        g = torch.Generator().manual_seed(99)
        out = generate(small_model, GROUPS, max_new_tokens=8, pad_token_id=0, generator=g, **CASES[name])
    finally:
        hook.remove()
    # the prefill (3 distinct prompts), then the first decode step: every row that goes on
    assert prefill_rows[:2] == [3, sum(len(t) > 1 for t in tokens)]
    assert out.tokens == tokens
    assert out.truncated == [len(t) == 8 for t in tokens]
    assert [sum(r) for r in out.logprobs] == pytest.approx(logp_sums, abs=2e-4)
    assert torch.randint(0, 2**31, (1,), generator=g).item() == next_draw


def test_generate_pinned_sequences_bench_shaped() -> None:
    """Hidden 128, 4 layers, vocab 300 (the benchmark's shape), 12 ragged prompts, top-p, stops."""
    cfg = tiny_config(
        vocab_size=300, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
        q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    )
    model = randomize(KimiForCausalLM(cfg), seed=5)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in torch.randint(3, 20, (12,), generator=g)]
    out = generate(
        model, prompts, max_new_tokens=16, temperature=1.0, top_p=0.95, stop_token_ids=[7, 8, 9, 10, 11],
        pad_token_id=0, generator=g,
    )
    assert out.tokens == BIG_TOKENS
    assert out.truncated == [len(t) == 16 for t in BIG_TOKENS]
    assert [sum(r) for r in out.logprobs] == pytest.approx(BIG_LOGP_SUMS, abs=2e-4)
    assert torch.randint(0, 2**31, (1,), generator=g).item() == 443889960


def test_last_token_only_matches_full_forward(small_model: KimiForCausalLM) -> None:
    """The top layer computes only the last position with ``last_token_only`` (plain, cached and
    frozen-cached paths); the cache still gets every position's latent."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = ids != 0
    with torch.no_grad():
        full = small_model(ids, attention_mask=mask)[:, -1:]
        plain = small_model(ids, attention_mask=mask, last_token_only=True)
        cache = small_model.new_cache(batch_size=2, max_len=8)
        cached = small_model(ids, attention_mask=mask, cache=cache, last_token_only=True)
        with small_model.frozen_weights():
            frozen_cache = small_model.new_cache(batch_size=2, max_len=8)
            frozen = small_model(ids, attention_mask=mask, cache=frozen_cache, last_token_only=True)
    for out in (plain, cached, frozen):
        assert out.shape == full.shape and torch.allclose(out, full, atol=1e-5, rtol=0)
    assert torch.allclose(frozen_cache.latent, cache.latent, atol=1e-5, rtol=0)


def test_cache_keep_rows_repeats_drops_and_reuses_its_buffers(small_model: KimiForCausalLM) -> None:
    """``keep_rows`` takes rows in the order given (repeats allowed), and after the first call
    copies into the spare buffer instead of allocating one per call."""
    cache = small_model.new_cache(batch_size=3, max_len=6)
    cache.latent.copy_(torch.arange(cache.latent.numel(), dtype=cache.latent.dtype).view_as(cache.latent))
    cache.next_position.copy_(torch.tensor([4, 5, 6]))
    expected = cache.latent.index_select(1, torch.tensor([2, 0, 0, 1]))
    cache.keep_rows(torch.tensor([2, 0, 0, 1]))  # grows: new buffers
    assert torch.equal(cache.latent, expected) and cache.next_position.tolist() == [6, 4, 4, 5]
    spare = cache._buffers[1]
    expected = expected.index_select(1, torch.tensor([0, 3]))
    cache.keep_rows(torch.tensor([0, 3]))
    assert torch.equal(cache.latent, expected) and cache.next_position.tolist() == [6, 5]
    assert cache.latent.data_ptr() == spare.data_ptr()  # the spare was reused
    cache.keep_rows(torch.tensor([1]))
    assert torch.equal(cache.latent, expected[:, 1:]) and cache.batch_size == 1
