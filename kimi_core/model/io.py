"""Save and load the model as an HF-format checkpoint: ``config.json`` + safetensors.

The directory layout (one ``model.safetensors``, or shards + ``model.safetensors.index.json``)
is defined and read in ``kimi_core.checkpoint.hf``; tensors are read and the index written by
``kimi_core.checkpoint.safetensors_io``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from kimi_core.checkpoint.hf import SINGLE_NAME
from kimi_core.checkpoint.safetensors_io import (
    TensorReader,
    read_checkpoint_entries,
    write_index,
)
from kimi_core.model.config import ModelConfig, load_config
from kimi_core.model.deepseek import KimiForCausalLM


def save_pretrained(
    model: KimiForCausalLM,
    config: ModelConfig,
    path: str | Path,
    *,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write ``config.json`` and the weights under directory ``path``; returns ``path``.

    Tensors are packed greedily in state_dict order; a new shard starts when adding a tensor
    would exceed ``max_shard_bytes`` (a single larger tensor gets its own shard).
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards = _plan_shards(state, max_shard_bytes=max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(state, str(out / SINGLE_NAME), metadata=metadata)
        return out
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(out / name), metadata=metadata)
        weight_map.update({k: name for k in keys})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_index(out, weight_map, total)
    return out


def _plan_shards(state: dict[str, torch.Tensor], *, max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read all tensors of a single-file or sharded checkpoint directory.

    The directory is read by `kimi_core.checkpoint.safetensors_io.read_checkpoint_entries`
    (ValueError for a missing shard or an index that contradicts its shards).
    """
    with TensorReader() as reader:
        return {key: reader.read(entry) for key, entry in read_checkpoint_entries(path).items()}


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32) -> KimiForCausalLM:
    """Build the model from ``path/config.json`` and load its weights, cast to ``dtype``.

    Raises ValueError naming every missing and unexpected key.
    """
    config = load_config(path)
    state = load_state_dict(path)
    model = KimiForCausalLM(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its config: missing keys {missing}, unexpected keys {unexpected}"
        )
    shapes = model.state_dict()
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(shapes[k].shape)}"
             for k in sorted(expected) if state[k].shape != shapes[k].shape]
    if wrong:
        raise ValueError(f"checkpoint {path} has tensors of the wrong shape: {wrong}")
    model.load_state_dict(state, strict=True)
    model.to(dtype)
    for module in model.modules():  # routing bias stays fp32, as upstream keeps it
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    return model.eval()
