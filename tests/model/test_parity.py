"""Logit parity with transformers' DeepseekV3ForCausalLM loading our saved weights (fp32, eager).

Tolerance 1e-5 absolute on logits of magnitude ~3.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from kimi_core.model import save_pretrained
from kimi_core.model.layers import ONEDNN_MIN_PRODUCT, FrozenWeight

TOL = 1e-5
CASES = {
    "tiny-yarn-qlora": dict(),
    "no-q-lora-no-rope-scaling": dict(q_lora_rank=None, rope_scaling=None),
    "grouped-router": dict(n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=2),
    "yarn-mscale-differs": dict(
        rope_scaling=dict(type="yarn", factor=8.0, original_max_position_embeddings=16,
                          beta_fast=4.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=1.0),
        first_k_dense_replace=2, num_hidden_layers=3, max_position_embeddings=128,
    ),
}


def hf_from_ours(model, cfg, path) -> transformers.PreTrainedModel:
    save_pretrained(model, cfg, path)
    hf, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return hf.eval()


def left_padded_batch(seed: int, *, vocab: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    length = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), length), generator=g)
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, length - n :] = 1
    return ids, mask


@pytest.mark.parametrize("case", sorted(CASES))
def test_full_forward_and_cached_decode_match_transformers(case, make_model, tmp_path) -> None:
    model, cfg = make_model(seed=1, **CASES[case])
    hf = hf_from_ours(model, cfg, tmp_path)
    ids, mask = left_padded_batch(2, vocab=cfg.vocab_size, lengths=[24, 17, 9])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    real = mask.bool()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
        ours = model(ids, attention_mask=mask)
        assert ours.abs().max() > 1.0  # non-trivial logits, so the tolerance means something
        assert (ours - theirs)[real].abs().max() <= TOL

        unpadded = hf(ids[:1]).logits  # row 0 has no padding: plain positions
        assert (model(ids[:1]) - unpadded).abs().max() <= TOL

        decoded = decode_step_by_step(model, ids, mask, prefix=10)
        assert (decoded - theirs)[real].abs().max() <= TOL
        with model.frozen_weights():  # the sampling path: absorbed MLA, batched experts
            frozen = decode_step_by_step(model, ids, mask, prefix=10)
        assert (frozen - theirs)[real].abs().max() <= TOL


def decode_step_by_step(model, ids: torch.Tensor, mask: torch.Tensor, *, prefix: int) -> torch.Tensor:
    """Logits ``[B,T,V]`` from a cached prefill of ``prefix`` tokens then one token per call."""
    cache = model.new_cache(batch_size=ids.shape[0], max_len=ids.shape[1])
    steps = [model(ids[:, :prefix], attention_mask=mask[:, :prefix], cache=cache)]
    for t in range(prefix, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, t : t + 1], cache=cache))
    assert cache.length == ids.shape[1]
    return torch.cat(steps, dim=1)


def test_frozen_weights_match_and_are_released(make_model) -> None:
    model, cfg = make_model(seed=5, n_group=4, topk_group=2)
    ids, mask = left_padded_batch(6, vocab=cfg.vocab_size, lengths=[30, 21])
    with torch.no_grad():
        plain = model(ids, attention_mask=mask)
        with model.frozen_weights():
            fused = model(ids, attention_mask=mask)  # 60 tokens: the batched expert path
            moe = model.model.layers[1].mlp
            x = torch.randn(700, cfg.hidden_size)  # above BATCHED_MAX_TOKENS: the loop path
            assert torch.allclose(moe(x), moe._routed_loop(x, *moe.gate(x), into=moe.shared_experts(x)), atol=1e-6)
    real = mask.bool()
    assert (plain - fused)[real].abs().max() <= TOL
    assert all(getattr(m, "_frozen", None) is None for m in model.modules()) and model._frozen_head is None


def test_padded_row_equals_unpadded_row(make_model) -> None:
    model, cfg = make_model(seed=3)
    ids, mask = left_padded_batch(4, vocab=cfg.vocab_size, lengths=[20, 7])
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        alone = model(ids[1:, -7:])
    assert (batched[1, -7:] - alone[0]).abs().max() <= TOL
    assert torch.isfinite(batched).all()  # pad query rows are finite too


def test_state_dict_keys_are_the_transformers_keys(make_model) -> None:
    model, cfg = make_model(seed=0)
    hf_model = transformers.DeepseekV3ForCausalLM(transformers.AutoConfig.for_model(**cfg.to_hf_dict()))
    ours = set(model.state_dict())
    # transformers fuses experts in memory; its checkpoint names are per expert, as ours.
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in ours
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in ours
    non_expert = {k for k in hf_model.state_dict() if ".mlp.experts." not in k}
    assert non_expert == {k for k in ours if ".mlp.experts." not in k}


@pytest.mark.parametrize("rows", [3, 400, 448])  # matmul; oneDNN with and without padding
def test_frozen_weight_matches_matmul_below_and_above_the_onednn_threshold(rows: int) -> None:
    """``FrozenWeight`` (the frozen path's matmul) gives ``x @ W`` and ``residual + x @ W`` on both of
    its paths: MKL's ``matmul`` for small products, oneDNN (where built in) from
    ``ONEDNN_MIN_PRODUCT`` rows x outputs."""
    assert (rows * 64 >= ONEDNN_MIN_PRODUCT) == (rows > 3)
    g = torch.Generator().manual_seed(rows)
    w_t, x, residual = (torch.randn(*shape, generator=g) for shape in ((48, 64), (rows, 48), (rows, 64)))
    frozen = FrozenWeight(w_t.t().contiguous().t())  # any layout in; a contiguous copy is kept
    assert (frozen.onednn_weight is not None) == torch.backends.mkldnn.is_available()
    assert frozen.takes_onednn(rows) == (rows > 3 and torch.backends.mkldnn.is_available())
    assert torch.allclose(frozen(x), x @ w_t, atol=1e-5, rtol=1e-5)
    assert torch.allclose(frozen(x.view(rows, 1, 48)), (x @ w_t).view(rows, 1, 64), atol=1e-5, rtol=1e-5)
    assert torch.allclose(frozen.add_to(residual, x), residual + x @ w_t, atol=1e-5, rtol=1e-5)
    half = FrozenWeight(w_t.bfloat16())
    assert half.onednn_weight is None and torch.equal(half(x.bfloat16()), x.bfloat16() @ w_t.bfloat16())
