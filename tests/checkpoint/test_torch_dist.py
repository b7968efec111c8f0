"""HF safetensors -> Megatron torch_dist -> HF: bit-exact, layout as Megatron reads it."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor

from kimi_core.checkpoint.cpu_compat import megatron_on_cpu
from kimi_core.checkpoint.torch_dist import (
    convert_hf_to_torch_dist,
    convert_torch_dist_to_hf,
    partition,
    process_group,
)
from tests.checkpoint.helpers import bitwise_equal, convert_worker, load_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_round_trip_is_bit_exact_and_restores_the_directory(tiny_hf, tmp_path: Path) -> None:
    hf_dir, tensors = tiny_hf
    release = convert_hf_to_torch_dist(hf_dir, tmp_path / "td")
    assert release == tmp_path / "td" / "release"
    assert (tmp_path / "td" / "latest_checkpointed_iteration.txt").read_text() == "release"
    names = {p.name for p in release.iterdir()}
    assert {".metadata", "common.pt", "metadata.json", "__0_0.distcp"} <= names
    assert json.loads((release / "metadata.json").read_text())["sharded_backend"] == "torch_dist"

    back = convert_torch_dist_to_hf(tmp_path / "td", tmp_path / "hf2")
    restored = load_dir(back)
    assert restored.keys() == tensors.keys()
    assert {t.dtype for t in restored.values()} == {torch.bfloat16, torch.float32}
    assert all(bitwise_equal(restored[k], tensors[k]) for k in tensors)
    assert (back / "config.json").read_text() == (hf_dir / "config.json").read_text()
    assert (back / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    index = json.loads((back / "model.safetensors.index.json").read_text())
    original = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == original["weight_map"]
    assert index["metadata"]["total_size"] == original["metadata"]["total_size"]


def test_megatron_reads_concatenated_fc1_and_stacked_experts(tiny_hf, tmp_path: Path) -> None:
    hf_dir, tensors = tiny_hf
    release = convert_hf_to_torch_dist(hf_dir, tmp_path / "td")
    layer = "model.layers.2.mlp"
    request = {
        "experts_fc1": ShardedTensor.from_rank_offsets(
            "decoder.layers.2.mlp.experts.experts.linear_fc1.weight", torch.empty(4, 64, 64, dtype=torch.bfloat16),
            replica_id=0),
        "dense_fc1": ShardedTensor.from_rank_offsets(
            "decoder.layers.0.mlp.linear_fc1.weight", torch.empty(192, 64, dtype=torch.bfloat16), replica_id=0),
        "bias": ShardedTensor.from_rank_offsets(
            "decoder.layers.2.mlp.router.expert_bias", torch.empty(4, dtype=torch.float32), replica_id=0),
    }
    with process_group(rank=0, world_size=1), megatron_on_cpu():
        loaded = dist_checkpointing.load(request, str(release))
    for e in range(4):
        expected = torch.cat([tensors[f"{layer}.experts.{e}.gate_proj.weight"],
                              tensors[f"{layer}.experts.{e}.up_proj.weight"]])
        assert bitwise_equal(loaded["experts_fc1"][e], expected)
    dense = torch.cat([tensors["model.layers.0.mlp.gate_proj.weight"], tensors["model.layers.0.mlp.up_proj.weight"]])
    assert bitwise_equal(loaded["dense_fc1"], dense)
    assert bitwise_equal(loaded["bias"], tensors[f"{layer}.gate.e_score_correction_bias"])


def test_several_ranks_write_one_checkpoint(tiny_hf, tmp_path: Path) -> None:
    hf_dir, tensors = tiny_hf
    world_size = 3
    mp.start_processes(convert_worker, args=(world_size, _free_port(), str(hf_dir), str(tmp_path / "td")),
                       nprocs=world_size, join=True, start_method="spawn")
    release = tmp_path / "td" / "release"
    assert {f"__{r}_0.distcp" for r in range(world_size)} <= {p.name for p in release.iterdir()}
    # small load groups: chunks of one Megatron tensor are read in different groups
    restored = load_dir(convert_torch_dist_to_hf(tmp_path / "td", tmp_path / "hf2", load_group_bytes=4096))
    assert restored.keys() == tensors.keys()
    assert all(bitwise_equal(restored[k], tensors[k]) for k in tensors)


def test_partition_is_disjoint_and_balanced(tiny_hf) -> None:
    from kimi_core.checkpoint.keys import ModelLayout, place_hf_tensors

    hf_dir, tensors = tiny_hf
    layout = ModelLayout.from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    placements = place_hf_tensors(layout, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
    parts = partition(placements, 4)
    assert [p for part in parts for p in part] == placements
    sizes = [sum(p.nbytes for p in part) for part in parts]
    # each run starts within its 1/4 of the bytes, so it is within one tensor of total/4 either way
    assert max(sizes) - min(sizes) <= 2 * max(p.nbytes for p in placements)


def test_without_q_lora_round_trips(make_checkpoint, tmp_path: Path) -> None:
    hf_dir, tensors = make_checkpoint(q_lora_rank=None, num_shards=1)
    convert_hf_to_torch_dist(hf_dir, tmp_path / "td")
    restored = load_dir(convert_torch_dist_to_hf(tmp_path / "td", tmp_path / "hf2"))
    assert all(bitwise_equal(restored[k], tensors[k]) for k in tensors)


def test_missing_key_fails_before_writing(tiny_hf, tmp_path: Path) -> None:
    hf_dir, _ = tiny_hf
    index_path = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.self_attn.kv_b_proj.weight"]
    index_path.write_text(json.dumps(index))
    # the key is still in its shard, so the index and the shard disagree
    with pytest.raises(ValueError, match="kv_b_proj"):
        convert_hf_to_torch_dist(hf_dir, tmp_path / "td")
    assert not (tmp_path / "td").exists()


def test_tensor_absent_from_checkpoint_is_named(make_checkpoint, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    hf_dir, tensors = make_checkpoint(num_shards=1)
    del tensors["model.layers.2.mlp.experts.1.down_proj.weight"]
    save_file(tensors, str(hf_dir / "model-00001-of-00001.safetensors"))
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in tensors}}))
    with pytest.raises(ValueError, match=r"1 missing key\(s\).*experts\.1\.down_proj"):
        convert_hf_to_torch_dist(hf_dir, tmp_path / "td")
