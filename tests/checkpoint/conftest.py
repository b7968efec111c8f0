"""Fixtures: tiny DeepSeek-V3-shaped HF checkpoints in tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.checkpoint.helpers import write_tiny_checkpoint


@pytest.fixture
def tiny_hf(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path / "hf"
    return path, write_tiny_checkpoint(path)


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., tuple[Path, dict[str, torch.Tensor]]]:
    def make(name: str = "hf", **kwargs: object) -> tuple[Path, dict[str, torch.Tensor]]:
        path = tmp_path / name
        return path, write_tiny_checkpoint(path, **kwargs)
    return make
