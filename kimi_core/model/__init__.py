"""Kimi-K2 / DeepSeek-V3 causal LM in plain torch (HF-compatible weights), I/O and sampling."""

from kimi_core.model.attention import MLACache
from kimi_core.model.config import ModelConfig, load_config, tiny_config
from kimi_core.model.deepseek import KimiForCausalLM
from kimi_core.model.io import load_model, load_state_dict, save_pretrained
from kimi_core.model.sampling import GenerationOutput, generate, token_logprobs

__all__ = [
    "GenerationOutput",
    "KimiForCausalLM",
    "MLACache",
    "ModelConfig",
    "generate",
    "load_config",
    "load_model",
    "load_state_dict",
    "save_pretrained",
    "tiny_config",
    "token_logprobs",
]
