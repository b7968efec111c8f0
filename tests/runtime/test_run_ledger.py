"""The run's ledger against a real MLflow server: extending a finished run, the run's status after a
failed attempt, the experiment's kind, and stage records keyed by the stage's own content check."""

from __future__ import annotations

import uuid
from pathlib import Path

from mlflow import MlflowClient

from kimi_core.runtime.context import RunContext
from kimi_core.runtime.ledger import RUN_LENGTH_KEY, RunLedger
from kimi_core.runtime.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

REPO = Path(__file__).resolve().parents[2]


def _ctx(base: Path, run: str, *, num_rollout: int, experiment: str) -> RunContext:
    return RunContext(recipe_path=str(REPO / "configs/local.yaml"), run_name=run, base_dir=str(base),
                      num_rollout=num_rollout, overrides=(f"tracking.experiment={experiment}",))


def test_extending_a_finished_run_reopens_the_same_mlflow_run(mlflow_server: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    experiment = f"ledger-{uuid.uuid4().hex[:8]}"
    first = RunLedger(_ctx(tmp_path, "extend", num_rollout=50, experiment=experiment))
    run_id = first.open_tracking(attempt=0).run_id
    first.tracker.close("FINISHED")
    first.manifest.update(finished=True)

    longer = RunLedger(_ctx(tmp_path, "extend", num_rollout=53, experiment=experiment))
    assert longer.open_tracking(attempt=1).run_id == run_id  # no "param changed" error
    assert not longer.manifest.finished  # running again until rollout 52 is done
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert RUN_LENGTH_KEY not in run.data.params and run.data.params["grpo.eps_clip_high"] == "0.28"
    assert run.data.tags[RUN_LENGTH_KEY] == "53" and run.data.tags["resume_count"] == "1"
    assert run.info.status == "RUNNING"

    experiment_tags = MlflowClient(mlflow_server).get_experiment_by_name(experiment).tags
    assert experiment_tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # the UI opens on the training view


def test_a_failed_attempt_never_marks_a_finished_run_failed(mlflow_server: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    experiment = f"ledger-{uuid.uuid4().hex[:8]}"
    ledger = RunLedger(_ctx(tmp_path, "done", num_rollout=4, experiment=experiment))
    run_id = ledger.open_tracking(attempt=0).run_id
    ledger.tracker.close("FINISHED")

    # a later attempt fails before it reopened the run (e.g. a stage failed): the run stays FINISHED
    RunLedger(_ctx(tmp_path, "done", num_rollout=8, experiment=experiment)).close_tracking("FAILED")
    client = MlflowClient(mlflow_server)
    assert client.get_run(run_id).info.status == "FINISHED"

    # an attempt that reopened it and then failed does end it FAILED
    reopened = RunLedger(_ctx(tmp_path, "done", num_rollout=8, experiment=experiment))
    reopened.open_tracking(attempt=1)
    RunLedger(_ctx(tmp_path, "done", num_rollout=8, experiment=experiment)).close_tracking("FAILED")
    assert client.get_run(run_id).info.status == "FAILED"
