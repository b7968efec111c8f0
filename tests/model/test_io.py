"""Checkpoint I/O: single file and sharded round trips, clear errors for broken checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kimi_core.model import generate, load_model, load_state_dict, save_pretrained


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_single_file_round_trip(make_model, tmp_path) -> None:
    model, cfg = make_model(seed=5)
    save_pretrained(model, cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path)
    assert loaded.config == cfg
    assert_same_weights(model, loaded)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_sharded_round_trip_and_index(make_model, tmp_path) -> None:
    model, cfg = make_model(seed=6)
    state = model.state_dict()
    save_pretrained(model, cfg, tmp_path, max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shards:  # every key is in the shard the index names, and each shard is small
        keys = set(load_file(tmp_path / shard))
        assert keys == {k for k, v in index["weight_map"].items() if v == shard}
        assert (tmp_path / shard).stat().st_size <= 64 * 1024 + 4096 or len(keys) == 1
    assert_same_weights(model, load_model(tmp_path))


def test_missing_shard_is_named(make_model, tmp_path) -> None:
    model, cfg = make_model(seed=0)
    save_pretrained(model, cfg, tmp_path, max_shard_bytes=64 * 1024)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ValueError, match=victim.name):
        load_state_dict(tmp_path)


def test_missing_and_unexpected_keys_are_named(make_model, tmp_path) -> None:
    model, cfg = make_model(seed=0)
    save_pretrained(model, cfg, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.2.mlp.gate.e_score_correction_bias"]
    state["model.layers.9.mlp.gate.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert "missing keys ['model.layers.2.mlp.gate.e_score_correction_bias']" in message
    assert "unexpected keys ['model.layers.9.mlp.gate.weight']" in message


def test_wrong_shape_and_empty_dir_errors(make_model, tmp_path) -> None:
    model, cfg = make_model(seed=0)
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_state_dict(tmp_path)
    save_pretrained(model, cfg, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(tmp_path)


def test_load_model_casts_to_bf16_keeps_router_bias_fp32_and_samples(make_model, tmp_path) -> None:
    model, cfg = make_model(seed=0)
    save_pretrained(model, cfg, tmp_path)
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.tensor([[1, 2, 3]])).float()).all()
    out = generate(loaded, [[1, 2, 3], [4]], max_new_tokens=5, temperature=1.0, top_p=0.9,
                   stop_token_ids=[], pad_token_id=0, generator=torch.Generator().manual_seed(0))
    assert [len(t) for t in out.tokens] == [5, 5]
    assert all(lp <= 0 for row in out.logprobs for lp in row)
