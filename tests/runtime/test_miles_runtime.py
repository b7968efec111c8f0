"""The runtime around a self-logging engine (miles), with the double of miles and a real MLflow server.

miles logs its metrics into the run's MLflow run itself (the double's "secondary loggers" do the
same through `MlflowClient`); the runtime reads each rollout's and eval's metrics back for the
return value and the progress line, logs only the driver's own (`perf/step_time`,
`perf/driver/*`, the checkpoint URI), and never logs one metric twice. Also the wiring of the
sbatch fallback (the engine built with the run's MLflow run and the converted reference), a session
lost mid-run and resumed, and the Ray actor options of a GPU recipe.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from kimi_core.engines.base import EvalResult, RolloutResult
from kimi_core.engines.miles.api import API_ENV
from kimi_core.recipe import load_recipe
from kimi_core.runtime.failures import SessionLost
from kimi_core.runtime.fallback import run_in_allocation
from kimi_core.runtime.ledger import RunLedger
from kimi_core.runtime.loop import StopRequest
from kimi_core.runtime.manifest import Manifest
from kimi_core.runtime.progress import Progress
from kimi_core.runtime.recording import STEP_TIME_METRIC, RunRecorder, read_back
from kimi_core.runtime.session import HEAD_NODE_RESOURCE, KILL_CHILDREN_ENV, ActorOptions
from kimi_core.runtime.tracking import RunTracker
from tests.engines import fake_miles
from tests.engines.fake_miles import FakeMiles, metric_value
from tests.runtime.miles_double import NUM_ROLLOUT, REPO, STEPS_PER_ROLLOUT, tiny_gpu_ctx

DRIVER_KEYS = (STEP_TIME_METRIC, "perf/driver/generate_time", "perf/driver/train_time",
               "perf/driver/update_weights_time")


def _run(uri: str) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("readback") or None
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("readback")
    return client, client.create_run(experiment_id).info.run_id


def _log(client: MlflowClient, run_id: str, key: str, value: float, step: int) -> None:
    client.log_batch(run_id, metrics=[Metric(key, value, int(time.time() * 1000), step)])
    time.sleep(0.002)  # distinct timestamps: the later value is the later log


def test_read_back_takes_the_step_the_latest_duplicate_and_the_last_train_sub_step(mlflow_server: str) -> None:
    client, run_id = _run(mlflow_server)
    k = 3
    for rollout in range(3):
        _log(client, run_id, "rollout/raw_reward", 0.1 * rollout, rollout)
        for j in range(k):
            _log(client, run_id, "train/grad_norm", 10 * rollout + j, rollout * k + j)
    _log(client, run_id, "rollout/raw_reward", 0.99, 1)  # rollout 1 redone after a crash: a duplicate
    _log(client, run_id, "eval/aime", 0.5, 1)
    # Rollout 1 holds the latest values except raw_reward, whose latest step is 2: read from its history.
    got = read_back(client, run_id, 1, train_steps_per_rollout=k)
    assert got == {"rollout/raw_reward": 0.99, "train/grad_norm": 12.0, "eval/aime": 0.5}
    assert read_back(client, run_id, 2, train_steps_per_rollout=k) == {"rollout/raw_reward": 0.2,
                                                                       "train/grad_norm": 22.0}
    assert read_back(client, run_id, 2, train_steps_per_rollout=k, prefixes=("train/",)) == {"train/grad_norm": 22.0}
    assert read_back(client, run_id, 7, train_steps_per_rollout=k) == {}


def test_recorder_logs_only_the_drivers_metrics_of_a_self_logging_engine(mlflow_server: str) -> None:
    tracker = RunTracker()
    tracker.open(tracking_uri=mlflow_server, experiment="readback", run_name="recorder", run_id=None,
                 params={"a": 1}, tags={})
    double = FakeMiles()
    double.args = argparse.Namespace(use_mlflow=True, mlflow_tracking_uri=mlflow_server, mlflow_run_id=tracker.run_id)
    for rollout in range(2):  # what miles' processes log during rollout `rollout`
        double.log({"rollout/raw_reward": None, "rollout/step": None}, rollout)
        for j in range(2):
            double.log({"train/grad_norm": None, "train/step": None}, rollout * 2 + j)
    double.log({"eval/aime": None}, 1)
    recorder = RunRecorder(tracker, Progress(start=0, end=2), train_steps_per_rollout=2)

    result = recorder.rollout(RolloutResult(1, {"perf/driver/train_time": 2.0}, None, logged_by_engine=True),
                              step_time=3.0, log_metrics=True)
    assert result.metrics == {"rollout/raw_reward": metric_value("rollout/raw_reward", 1), "rollout/step": 1.0,
                              "train/grad_norm": metric_value("train/grad_norm", 3), "train/step": 3.0,
                              "perf/driver/train_time": 2.0, STEP_TIME_METRIC: 3.0}
    evaluated = recorder.eval(EvalResult(1, {}, (), logged_by_engine=True), log_metrics=True)
    assert evaluated.metrics == {"eval/aime": metric_value("eval/aime", 1)}

    history = {key: [(m.step, m.value) for m in tracker.client.get_metric_history(tracker.run_id, key)]
               for key in ("rollout/raw_reward", "train/grad_norm", "eval/aime", "perf/driver/train_time",
                           STEP_TIME_METRIC)}
    assert history["rollout/raw_reward"] == [(0, metric_value("rollout/raw_reward", 0)),
                                             (1, metric_value("rollout/raw_reward", 1))]  # not logged again
    assert len(history["train/grad_norm"]) == 4 and len(history["eval/aime"]) == 1
    assert history["perf/driver/train_time"] == [(1, 2.0)] and history[STEP_TIME_METRIC] == [(1, 3.0)]


def _histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


@pytest.fixture
def double_env(monkeypatch: pytest.MonkeyPatch, mlflow_server: str):
    """The double as miles (a fresh one per `new()`: one per process in real life) and MLflow at the server."""
    monkeypatch.setenv(API_ENV, "tests.engines.fake_miles:make_api")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)

    def new() -> FakeMiles:
        double = FakeMiles()
        monkeypatch.setattr(fake_miles, "CURRENT", double)
        return double

    return new


def test_fallback_with_the_double_resumes_a_lost_session_and_logs_each_metric_once(tmp_path: Path,
                                                                                  double_env) -> None:
    ctx = tiny_gpu_ctx(tmp_path / "base")
    first = double_env()
    # Rollout 2 dies in training: rollouts 0-1 are saved, and miles had logged rollout 2's reward.
    first.fail("actor.train", "ok", "ok", "die")
    with pytest.raises(SessionLost, match="broken"):
        run_in_allocation(ctx, StopRequest())
    ledger = RunLedger(ctx)
    params_before = ledger.tracker.client.get_run(ledger.tracker.run_id).data.params
    status_after_loss = ledger.tracker.status()
    second = double_env()  # the requeued job's process: a new miles
    second.value_offset = 1.0  # the redone rollout 2 logs other values than the lost attempt
    assert run_in_allocation(ctx, StopRequest()) == 0

    ledger = RunLedger(ctx)
    manifest = Manifest.load(ledger.paths)
    assert manifest.finished and status_after_loss == "FAILED" and ledger.tracker.status() == "FINISHED"
    client, run_id = ledger.tracker.client, ledger.tracker.run_id
    run = client.get_run(run_id)
    assert run.data.params == params_before and run.data.tags["engine"] == "miles"
    # The engine was built with the run's MLflow run and the converted reference.
    argv = second.args.argv
    assert argv[argv.index("--mlflow-run-id") + 1] == run_id
    assert argv[argv.index("--ref-load") + 1] == manifest.stages["convert_checkpoint"].result["ref_load"]
    histories = _histories(client, run_id)
    rewards = histories["rollout/raw_reward"]
    assert sorted({step for step, _ in rewards}) == list(range(NUM_ROLLOUT))
    # miles logged rollout 2's reward in both attempts (its own duplicate); the driver's keys once each.
    assert Counter(step for step, _ in rewards) == {0: 1, 1: 1, 2: 2, 3: 1}
    for key in DRIVER_KEYS:
        assert [step for step, _ in histories[key]] == list(range(NUM_ROLLOUT)), key
    # Rollout 2 died before miles logged its train sub-steps (4, 5): each sub-step once.
    assert [step for step, _ in histories["train/grad_norm"]] == list(range(NUM_ROLLOUT * STEPS_PER_ROLLOUT))
    assert [step for step, _ in histories["eval/aime"]] == [0, 1, 3]
    # What the runtime read back for rollout 2 is the redone attempt's value (the latest duplicate).
    assert read_back(client, run_id, 2, train_steps_per_rollout=STEPS_PER_ROLLOUT)["rollout/raw_reward"] == \
        metric_value("rollout/raw_reward", 2, 1.0)


def test_gpu_recipes_get_a_head_pinned_detached_actor_with_the_recipe_env(tmp_path: Path) -> None:
    recipe = tiny_gpu_ctx(tmp_path / "base").recipe()
    common = {"lifetime": "detached", "num_cpus": 1, "num_gpus": 0, "max_concurrency": 2, "max_restarts": 0}
    assert ActorOptions.for_recipe(recipe).ray_options() == {
        **common, "resources": {HEAD_NODE_RESOURCE: 0.001},
        "runtime_env": {"env_vars": {**recipe.env, KILL_CHILDREN_ENV: "1"}}}
    assert ActorOptions.for_recipe(load_recipe(REPO / "configs" / "local.yaml")).ray_options() == common
