"""ModelConfig: HF config.json round trips, transformers acceptance, validation errors."""

from __future__ import annotations

import json

import pytest
import transformers

from kimi_core.model import ModelConfig, load_config, tiny_config

KIMI_K2_LIKE = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "model_type": "kimi_k2",
    "vocab_size": 163840,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "n_shared_experts": 1,
    "n_routed_experts": 384,
    "routed_scaling_factor": 2.827,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "rms_norm_eps": 1e-5,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "beta_fast": 32.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0,
        "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn",
    },
    "max_position_embeddings": 262144,
    "tie_word_embeddings": False,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "torch_dtype": "bfloat16",
    "ep_size": 1,
    "quantization_config": {"quant_method": "compressed-tensors"},
}


def test_kimi_config_fields_are_read_and_unknown_keys_kept_aside() -> None:
    cfg = ModelConfig.from_hf_dict(KIMI_K2_LIKE)
    assert cfg.n_routed_experts == 384 and cfg.num_experts_per_tok == 8
    assert cfg.rope_scaling is not None and cfg.rope_scaling["factor"] == 64.0
    assert cfg.qk_head_dim == 192
    assert cfg.extra["ep_size"] == 1 and "auto_map" in cfg.extra


def test_to_hf_dict_round_trips_and_transformers_accepts_it(tmp_path) -> None:
    cfg = ModelConfig.from_hf_dict(KIMI_K2_LIKE)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert load_config(tmp_path) == cfg
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "DeepseekV3Config"
    assert hf.n_routed_experts == 384 and hf.q_lora_rank == 1536 and hf.routed_scaling_factor == 2.827
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 64.0
    assert hf.rope_parameters["rope_theta"] == 50000.0


def test_transformers_saved_config_with_rope_parameters_is_read(tmp_path) -> None:
    cfg = tiny_config(vocab_size=50)
    hf = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    hf.save_pretrained(tmp_path)
    assert load_config(tmp_path) == cfg


def test_no_rope_scaling_round_trip() -> None:
    cfg = tiny_config(vocab_size=50, rope_scaling=None, q_lora_rank=None)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_rejects_other_model_types() -> None:
    with pytest.raises(ValueError, match="model_type='llama'"):
        ModelConfig.from_hf_dict({**KIMI_K2_LIKE, "model_type": "llama"})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(n_group=3), "n_group"),
        (dict(num_key_value_heads=2), "num_key_value_heads"),
        (dict(topk_group=2), "topk_group"),
        (dict(scoring_func="softmax"), "scoring_func"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    ],
)
def test_invalid_settings_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny_config(vocab_size=50, **overrides)


def test_tiny_config_needs_vocab_and_missing_file_is_clear(tmp_path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_config()
    with pytest.raises(ValueError, match="config.json"):
        load_config(tmp_path)
