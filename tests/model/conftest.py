"""Fixtures for the model tests: randomly initialised tiny models with every mechanism active."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kimi_core.model import KimiForCausalLM, ModelConfig, tiny_config

VOCAB = 97


def randomize(model: KimiForCausalLM, *, seed: int, std: float = 0.1) -> KimiForCausalLM:
    """Random weights with non-trivial norms and routing bias, so every parameter matters.

    ``std=0.1`` gives logits of magnitude ~3 (the default 0.02 init would make them ~0.1).
    """
    torch.manual_seed(seed)
    model.reset_parameters(std=std)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.normal_(1.0, 0.2)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture
def make_model() -> Callable[..., tuple[KimiForCausalLM, ModelConfig]]:
    """``make_model(seed=0, **config_overrides) -> (model, config)`` on the tiny flavor."""

    def build(*, seed: int = 0, **overrides: object) -> tuple[KimiForCausalLM, ModelConfig]:
        cfg = tiny_config(vocab_size=VOCAB, **overrides)
        return randomize(KimiForCausalLM(cfg), seed=seed), cfg

    return build


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Toy models gain nothing from intra-op threads, and on a shared small box OpenMP threads
    spinning against other jobs can make them many times slower; restored after each test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
