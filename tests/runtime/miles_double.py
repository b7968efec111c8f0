"""A GPU-shaped recipe made tiny for the runtime tests with the miles double (`tests/engines/fake_miles.py`).

`configs/kimi-k25-grpo.yaml` as is (accelerator gpu, so `make_engine` returns `MilesEngine`), with
the local executor, 4 rollouts (saves after 1 and 3, evals after 1 and 3), a JSONL source for the
train and the `aime` eval set, and a one-tensor HF checkpoint as both the actor's and the
reference weights (BF16 actor: `convert_checkpoint` only verifies the reference).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from kimi_core.runtime.context import RunContext

REPO = Path(__file__).resolve().parents[2]
GPU_RECIPE = REPO / "configs" / "kimi-k25-grpo.yaml"
ROWS = [{"prompt": f"What is max({a}, {b})? Put the answer in \\boxed{{}}.", "label": str(max(a, b))}
        for a, b in [(3, 7), (12, 5), (40, 41), (9, 9), (1, 2), (8, 3)]]
NUM_ROLLOUT = 4
#: rollout batch 32 x 8 samples over a global batch of 128: two optimizer steps per rollout.
STEPS_PER_ROLLOUT = 2


def tiny_hf_checkpoint(path: Path) -> Path:
    """`config.json` and one safetensors shard holding one 2-element F32 tensor."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "kimi_k25"}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0))
    return path


def tiny_gpu_overrides(base: Path) -> list[str]:
    base.mkdir(parents=True, exist_ok=True)
    source = base / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    weights = tiny_hf_checkpoint(base / "tiny-hf")
    return ["cluster.executor=local", "checkpoint.actor_format=bf16", "grpo.int4_fake_qat=false",
            f"checkpoint.hf_checkpoint={weights}", f"checkpoint.ref_load={weights}",
            f"data.prompt_data={source}", f'eval.datasets=[{{name: aime, path: "{source}"}}]',
            "checkpoint.save_interval=2", "eval.interval=2", "rollout.global_batch_size=128"]


def tiny_gpu_ctx(base: Path, run: str = "miles-double") -> RunContext:
    return RunContext(recipe_path=str(GPU_RECIPE), run_name=run, base_dir=str(base),
                      overrides=tuple(tiny_gpu_overrides(base)), num_rollout=NUM_ROLLOUT)
