"""The flow on a GPU recipe, with the double of miles as the engine (`KIMI_GRPO_MILES_API`).

`kimi-grpo run configs/kimi-k25-grpo.yaml` made tiny (`tests/runtime/miles_double.py`: local
executor, 4 rollouts, a one-tensor HF checkpoint): real Prefect, MLflow and Ray; the engine actor
is a `MilesEngine` over `tests.engines.fake_miles` (the Ray head, and so the actor, inherits the
CLI's environment: the API switch and PYTHONPATH). The double logs miles' metrics into the run's
MLflow run itself; its actor process dies in the middle of rollout 2, and the flow brings the
cluster up again and resumes from the checkpoint of rollout 1. The sbatch fallback's run of the
same is `tests/runtime/test_miles_runtime.py` (in-process, fast).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kimi_core.engines.miles.api import API_ENV
from kimi_core.run_state import RunPaths, latest_checkpoint
from kimi_core.runtime.manifest import Manifest
from tests.engines.fake_miles import EXIT_ENV
from tests.pipeline.conftest import cli_env, run_cli
from tests.runtime.miles_double import GPU_RECIPE, NUM_ROLLOUT, STEPS_PER_ROLLOUT, tiny_gpu_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_flow_with_the_miles_double_survives_a_dead_session(prefect_server, mlflow_server, base_dir: Path) -> None:
    marker = base_dir / "died-once"
    sets = [arg for override in tiny_gpu_overrides(base_dir) for arg in ("--set", override)]
    env = cli_env(prefect_server, MLFLOW_TRACKING_URI=mlflow_server, **{API_ENV: "tests.engines.fake_miles:make_api",
                                                                       EXIT_ENV: f"2:{marker}"})
    proc = run_cli(["run", str(GPU_RECIPE), "--run-name", "miles-double", "--base-dir", str(base_dir),
                    "--num-rollout", str(NUM_ROLLOUT), *sets], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists(), "the engine actor never died"
    assert "engine session lost" in proc.stderr
    assert f"rollout {NUM_ROLLOUT}/{NUM_ROLLOUT}  reward 0." in proc.stderr  # read back from MLflow

    paths = RunPaths.of(base_dir, "miles-double")
    manifest = Manifest.load(paths)
    assert manifest.finished and latest_checkpoint(paths) == NUM_ROLLOUT - 1
    client = MlflowClient(mlflow_server)
    run = client.get_run(manifest.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["engine"] == "miles"

    def steps(key: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))

    # miles' own metrics (the double's loggers) at every step; rollout 2's reward twice (its first
    # attempt logged it before the actor died); the driver's metrics once per rollout.
    assert Counter(steps("rollout/raw_reward")) == {0: 1, 1: 1, 2: 2, 3: 1}
    assert steps("train/grad_norm") == list(range(NUM_ROLLOUT * STEPS_PER_ROLLOUT))
    assert steps("eval/aime") == [0, 1, 3]
    assert steps("perf/step_time") == list(range(NUM_ROLLOUT))
    assert steps("perf/driver/train_time") == list(range(NUM_ROLLOUT))
