"""HF safetensors <-> Megatron `torch_dist`, streaming one tensor at a time.

Format: megatron-core's `dist_checkpointing` (backend `torch_dist`: `.metadata`, `__R_N.distcp`,
`common.pt`, `metadata.json`) at `{out}/release/`, tracker `{out}/latest_checkpointed_iteration.txt`
= `release`, as miles' converter writes it. `dist_checkpointing.save` does the sharding
validation, `common.pt` and `metadata.json`; its sharded part goes through a small strategy
(`_StreamingTorchDistSave`) that hands `torch.distributed.checkpoint`'s `FileSystemWriter` a
planner resolving each tensor only when the writer asks for it. The state dict holds meta
tensors, so resident memory stays near the largest tensor in flight, not a shard or the model.
(megatron's own writer resolves every tensor of a rank before writing, i.e. the rank's whole
share.) The files are plain `torch_dist`; `dist_checkpointing.load` reads them back.

The common state (`common.pt`) also keeps the HF side: `config.json`, the small side files
(tokenizer, generation config) and the original `weight_map`, so the reverse conversion
restores the same HF directory.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict, cast

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, WriteItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from kimi_core.checkpoint.cpu_compat import megatron_on_cpu
from kimi_core.checkpoint.hf import INDEX_NAME
from kimi_core.checkpoint.keys import ModelLayout, TensorPlacement, place_from_megatron, place_hf_tensors
from kimi_core.checkpoint.safetensors_io import (
    TensorReader,
    read_checkpoint_entries,
    write_index,
    write_streaming,
)
from kimi_core.run_state import TRACKER_FILENAME

RELEASE = "release"
COMMON_KEY = "kimi_hf"
SIDE_FILE_MAX_BYTES = 32 << 20
Loader = Callable[[], torch.Tensor]


class HfSideState(TypedDict):
    """The HF side kept in `common.pt`: parsed `config.json`, small side files, original weight map."""

    config: dict[str, Any]
    files: dict[str, bytes]
    weight_map: dict[str, str] | None


class _LazyPlanner(MCoreSavePlanner):  # type: ignore[misc]  # megatron-core ships no type information
    """Resolves `(global key, chunk offset)` write items by calling a loader at write time."""

    def __init__(self, loaders: dict[tuple[str, tuple[int, ...]], Loader], **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._loaders = loaders

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        loader = self._loaders.get((write_item.index.fqn, tuple(write_item.index.offset or ())))
        if loader is None:
            resolved: torch.Tensor | io.BytesIO = super().resolve_data(write_item)
            return resolved
        assert write_item.tensor_data is not None  # a tensor write item (only those have loaders)
        return loader().reshape(write_item.tensor_data.chunk.sizes)


class _StreamingTorchDistSave(TorchDistSaveShardedStrategy):  # type: ignore[misc]  # megatron-core ships no type information
    """`torch_dist` save whose tensors are produced lazily by `loaders`."""

    def __init__(self, loaders: dict[tuple[str, tuple[int, ...]], Loader], *, thread_count: int) -> None:
        super().__init__("torch_dist", 1, thread_count=thread_count)
        self._loaders = loaders

    def save(self, sharded_state_dict: dict[str, Any], checkpoint_dir: str | Path) -> None:
        state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        writer = FileSystemWriter(checkpoint_dir, thread_count=self.thread_count)
        planner = _LazyPlanner(self._loaders, dedup_replicated_tensors=False, flatten_state_dict=False)
        dcp_save(mcore_to_pyt_state_dict(state_dict, False), storage_writer=writer, planner=planner)


@contextlib.contextmanager
def process_group(*, rank: int, world_size: int) -> Iterator[None]:
    """Use the initialized process group, or start gloo for the duration of the block.

    One process: an in-memory store, no network. Several: `MASTER_ADDR`/`MASTER_PORT` from the
    environment (torchrun sets them), `rank`/`world_size` from the arguments.
    """
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise ValueError(f"rank/world_size {rank}/{world_size} differ from the process group's "
                             f"{dist.get_rank()}/{dist.get_world_size()}")
        yield
        return
    if world_size == 1:
        # torch.distributed imports HashStore without re-exporting it in its typing (the documented name)
        store = dist.HashStore()  # type: ignore[attr-defined]
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    else:
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def partition(placements: list[TensorPlacement], world_size: int) -> list[list[TensorPlacement]]:
    """Split placements (in order) into `world_size` contiguous runs of about equal bytes."""
    total = sum(p.nbytes for p in placements)
    parts: list[list[TensorPlacement]] = [[] for _ in range(world_size)]
    done = 0
    for p in placements:
        part = min(world_size - 1, int(done * world_size / max(total, 1)))
        parts[part].append(p)
        done += p.nbytes
    return parts


def _hf_side_state(hf_dir: Path, weight_map: dict[str, str]) -> HfSideState:
    """config dict, small side files and the weight map, kept in `common.pt`."""
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{hf_dir}: config.json is missing")
    files = {f.name: f.read_bytes() for f in sorted(hf_dir.iterdir())
             if f.is_file() and not f.name.startswith(".") and f.suffix != ".safetensors"
             and f.name != INDEX_NAME and f.stat().st_size <= SIDE_FILE_MAX_BYTES}
    return {"config": json.loads(config_path.read_text()), "files": files, "weight_map": weight_map}


def convert_hf_to_torch_dist(hf_dir: str | Path, out_dir: str | Path, *, rank: int = 0,
                             world_size: int = 1, thread_count: int = 2) -> Path:
    """Write `{out_dir}/release` (torch_dist) from an HF DeepSeek-V3 checkpoint; returns its path.

    Every rank reads all headers (cheap) and writes a disjoint, byte-balanced run of tensors;
    with `world_size > 1` all ranks must call this together (gloo). `thread_count` writer
    threads per rank (each holds one tensor in flight) overlap reading and writing. Raises ValueError naming
    any missing or unexpected HF key before anything is written.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    entries = read_checkpoint_entries(hf_dir)
    side = _hf_side_state(hf_dir, {k: e.file.name for k, e in entries.items()})
    layout = ModelLayout.from_hf_config(side["config"])
    placements = place_hf_tensors(layout, {k: (e.dtype, e.shape) for k, e in entries.items()},
                                  where=str(hf_dir))
    mine = partition(placements, world_size)[rank]
    release = out_dir / RELEASE
    reader = TensorReader()
    loaders: dict[tuple[str, tuple[int, ...]], Loader] = {
        (p.spec.megatron_key, p.global_offset): functools.partial(reader.read, entries[p.spec.hf_key]) for p in mine}
    model = {p.spec.hf_key: ShardedTensor.from_rank_offsets(
        p.spec.megatron_key, torch.empty(p.shape, dtype=p.dtype, device="meta"),
        *p.spec.rank_offsets, replica_id=0, prepend_axis_num=p.spec.prepend_axis_num) for p in mine}
    state = {"model": model, "checkpoint_version": 3.0, "iteration": 0, COMMON_KEY: side}
    with process_group(rank=rank, world_size=world_size), megatron_on_cpu(), reader:
        if rank == 0:
            release.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(state, str(release),
                                sharded_strategy=_StreamingTorchDistSave(loaders, thread_count=thread_count))
        if rank == 0:
            (out_dir / TRACKER_FILENAME).write_text(RELEASE)
        dist.barrier()
    return release


def resolve_release_dir(ckpt_dir: str | Path) -> Path:
    """`{dir}/release` or `{dir}/iter_NNNNNNN` named by the tracker file, or `dir` itself."""
    ckpt_dir = Path(ckpt_dir)
    tracker = ckpt_dir / TRACKER_FILENAME
    if tracker.is_file():
        tag = tracker.read_text().strip()
        return ckpt_dir / (tag if tag == RELEASE else f"iter_{int(tag):07d}")
    if (ckpt_dir / ".metadata").is_file():
        return ckpt_dir
    raise ValueError(f"{ckpt_dir}: no {TRACKER_FILENAME} and no torch_dist .metadata")


def read_torch_dist(ckpt_dir: str | Path, *, hf_config: dict[str, Any] | None = None
                    ) -> tuple[Path, HfSideState, list[TensorPlacement]]:
    """(release dir, HF side state, placements) of a torch_dist checkpoint.

    The HF config comes from `common.pt` (written by `convert_hf_to_torch_dist`) or, for
    checkpoints written elsewhere, from `hf_config`.
    """
    release = resolve_release_dir(ckpt_dir)
    with process_group(rank=0, world_size=1) if not dist.is_initialized() else contextlib.nullcontext():
        common = dist_checkpointing.load_common_state_dict(str(release))
        with megatron_on_cpu():
            metadata = dist_checkpointing.load_tensors_metadata(str(release))
    # megatron returns the common state untyped; COMMON_KEY holds what `_hf_side_state` wrote
    side = cast(HfSideState, dict(common.get(COMMON_KEY) or {"files": {}, "weight_map": None}))
    if hf_config is not None:
        side["config"] = hf_config
    if "config" not in side:
        raise ValueError(f"{release}: no HF config in common.pt; pass hf_config")
    global_tensors = {k: (v.dtype, tuple(v.global_shape)) for k, v in metadata.items()}
    layout = ModelLayout.from_hf_config(side["config"])
    return release, side, place_from_megatron(layout, global_tensors, where=str(release))


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Reads chosen chunks of global tensors (any subset) into given buffers.

    megatron's loader builds a torch ShardedTensor whose grid must be all local or spread over
    other ranks, which fails for a subset of a key's chunks in a single process; reading the
    chunks through `torch.distributed.checkpoint` directly has no such limit.
    """

    def __init__(self, requests: dict[tuple[str, tuple[int, ...]], torch.Tensor]) -> None:
        super().__init__()
        self._requests = requests

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None  # set by set_up_planner before create_local_plan
        items = []
        for (fqn, offset), buffer in self._requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=buffer.shape)
            tensor_metadata = self.metadata.state_dict_metadata[fqn]
            if not isinstance(tensor_metadata, TensorStorageMetadata):
                raise ValueError(f"{fqn}: stored as bytes, not a tensor")
            items += create_read_items_for_chunk_list(fqn, tensor_metadata, [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        buffer = self._requests[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset or ()))]
        return narrow_tensor_by_index(buffer, read_item.dest_offsets, read_item.lengths)


def load_placements(release: Path, placements: list[TensorPlacement]) -> dict[str, torch.Tensor]:
    """Load the HF tensors of `placements` (any subset of chunks) from a torch_dist dir."""
    buffers = {p.spec.hf_key: torch.empty(p.shape, dtype=p.dtype) for p in placements}
    requests = {(p.spec.megatron_key, p.global_offset):
                buffers[p.spec.hf_key].view((1,) * p.spec.prepend_axis_num + p.shape) for p in placements}
    dcp_load({}, storage_reader=FileSystemReader(str(release)), planner=_ChunkLoadPlanner(requests),
             no_dist=not dist.is_initialized())
    return buffers


def _bounded_groups(placements: list[TensorPlacement], max_bytes: int) -> Iterator[list[TensorPlacement]]:
    group: list[TensorPlacement] = []
    size = 0
    for p in placements:
        if group and size + p.nbytes > max_bytes:
            yield group
            group, size = [], 0
        group.append(p)
        size += p.nbytes
    if group:
        yield group


def _output_files(placements: list[TensorPlacement], weight_map: dict[str, str] | None,
                  max_shard_bytes: int) -> dict[str, list[TensorPlacement]]:
    """Output shard name -> placements: the original layout when known, else size-bounded."""
    if weight_map:
        files: dict[str, list[TensorPlacement]] = {}
        for p in placements:
            files.setdefault(weight_map[p.spec.hf_key], []).append(p)
        return files
    groups = list(_bounded_groups(placements, max_shard_bytes))
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}


def convert_torch_dist_to_hf(ckpt_dir: str | Path, out_dir: str | Path, *, hf_config: dict[str, Any] | None = None,
                             max_shard_bytes: int = 4 << 30, load_group_bytes: int = 512 << 20) -> Path:
    """Write an HF safetensors checkpoint (shards + index + config.json) from torch_dist.

    Splits `linear_fc1` back into gate/up; loads at most `load_group_bytes` at a time.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with process_group(rank=0, world_size=1) if not dist.is_initialized() else contextlib.nullcontext():
        release, side, placements = read_torch_dist(ckpt_dir, hf_config=hf_config)
        weight_map: dict[str, str] = {}
        total = 0
        for name, file_placements in _output_files(placements, side["weight_map"], max_shard_bytes).items():
            def produce(keys: list[str], todo: list[TensorPlacement] = file_placements) -> Iterator[torch.Tensor]:
                for group in _bounded_groups(todo, load_group_bytes):
                    loaded = load_placements(release, group)
                    yield from (loaded.pop(p.spec.hf_key) for p in group)
            specs = [(p.spec.hf_key, p.dtype, p.shape) for p in file_placements]
            write_streaming(out_dir / name, specs, produce)
            total += sum(p.nbytes for p in file_placements)
            weight_map.update({p.spec.hf_key: name for p in file_placements})
    write_index(out_dir, weight_map, total)
    for name, data in side["files"].items():
        (out_dir / name).write_bytes(data)
    if hf_config is not None or "config.json" not in side["files"]:
        (out_dir / "config.json").write_text(json.dumps(side["config"], indent=2) + "\n")
    return out_dir
