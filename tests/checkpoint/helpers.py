"""Test helpers: tiny DeepSeek-V3-shaped HF checkpoints written with `safetensors` directly."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kimi_core.checkpoint.synthetic import hf_tensor_shapes, random_tensor, tiny_config


def write_tiny_checkpoint(path: Path, *, num_shards: int = 3, seed: int = 0,
                          **config_overrides: object) -> dict[str, torch.Tensor]:
    """Write config + shards + index with `safetensors.torch.save_file`; return the tensors.

    Norm weights are fp32 (the rest bf16) so both dtypes travel through every conversion.
    """
    config = tiny_config(**config_overrides)
    tensors = {}
    for key, (dtype, shape) in hf_tensor_shapes(config).items():
        dtype = torch.float32 if "norm" in key else dtype
        tensors[key] = random_tensor(key, dtype, shape, seed=seed)
    keys = list(tensors)
    path.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = keys[i * len(keys) // num_shards:(i + 1) * len(keys) // num_shards]
        save_file({k: tensors[k] for k in part}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    return tensors


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors directory, loaded with the `safetensors` package."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(str(path / "*.safetensors"))):
        tensors.update(load_file(file))
    return tensors


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def convert_worker(rank: int, world_size: int, port: int, hf_dir: str, out_dir: str) -> None:
    """One rank of a multi-process HF -> torch_dist conversion (gloo on 127.0.0.1)."""
    import os

    import torch.distributed as dist

    from kimi_core.checkpoint.torch_dist import convert_hf_to_torch_dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        convert_hf_to_torch_dist(hf_dir, out_dir, rank=rank, world_size=world_size)
    finally:
        dist.destroy_process_group()
