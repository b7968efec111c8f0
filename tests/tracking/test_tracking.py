"""MLflow tracking against a real MLflow server (and a local SQLite store)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from kimi_core.runtime.tracking import (
    MAX_PARAM_VALUE,
    RunTracker,
    flatten,
    sanitize_metric_name,
)
from kimi_core.runtime.tracking_uri import resolve_tracking_uri

RECIPE = {
    "model": {"name": "tiny-kimi", "num_layers": 2, "moe": {"num_experts": 8, "top_k": 2}},
    "grpo": {"eps_clip": 0.2, "eps_clip_high": 0.28, "use_kl_loss": False, "kl_coef": None},
    "rollout": {"num_rollout": 5, "stop": ["</s>", "\n\n"]},
}


def _open(uri: str, experiment: str, *, run_id: str | None, params: dict, job: str, attempt: str):
    tracker = RunTracker()
    opened = tracker.open(
        tracking_uri=uri,
        experiment=experiment,
        run_name="tiny-run",
        run_id=run_id,
        params=params,
        tags={"git_sha": "0123abc", "engine": "local"},
        slurm_job_ids=[job],
        attempt_id=attempt,
    )
    return tracker, opened


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        out.extend(_artifact_paths(client, run_id, info.path) if info.is_dir else [info.path])
    return out


# ----------------------------------------------------------------------------- pure helpers
def test_flatten() -> None:
    flat = flatten(RECIPE)
    assert flat["model.moe.num_experts"] == "8"
    assert flat["grpo.use_kl_loss"] == "false"
    assert flat["grpo.kl_coef"] == "null"
    assert flat["grpo.eps_clip"] == "0.2"
    assert flat["rollout.stop"] == '["</s>", "\\n\\n"]'
    assert flat["model.name"] == "tiny-kimi"
    assert flatten({"a": 1}, "train") == {"train.a": "1"}
    long = flatten({"prompt": "x" * 10_000})["prompt"]
    assert len(long) == MAX_PARAM_VALUE and long.endswith("[truncated, 10000 chars]")
    with pytest.raises(ValueError, match="longer than MLflow's 250"):
        flatten({"k" * 300: 1})


def test_sanitize_metric_name() -> None:
    assert sanitize_metric_name("eval/aime/pass@16") == "eval/aime/pass_at_16"
    assert sanitize_metric_name("train/pg_loss") == "train/pg_loss"
    assert sanitize_metric_name("eval/acc(%)") == "eval/acc___"


def test_resolve_tracking_uri(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(tmp_path / "run" / "mlflow.db")
    assert uri == f"sqlite:///{tmp_path.resolve()}/run/mlflow.db"
    assert uri.startswith("sqlite:////")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(tmp_path / "mlflow.db") == "http://127.0.0.1:5999"


# ----------------------------------------------------------------------------- real server
def test_open_log_resume_cycle(mlflow_server: str) -> None:
    experiment = f"kimi-{uuid.uuid4().hex[:8]}"
    params = flatten(RECIPE)
    first, run_id = _open(mlflow_server, experiment, run_id=None, params=params, job="11", attempt="a0")
    for step in range(3):
        logged = first.log_metrics(
            {"rollout/raw_reward": 0.1 * step, "eval/aime/pass@16": 0.2 + step}, step=step
        )
    assert logged["eval/aime/pass@16"] == "eval/aime/pass_at_16"
    first.close("FAILED")  # the attempt died

    second, reopened = _open(mlflow_server, experiment, run_id=run_id, params=params, job="12", attempt="a1")
    assert reopened == run_id
    # the same attempt opening again (a retried task) does not count as another resume
    _open(mlflow_server, experiment, run_id=run_id, params=params, job="12", attempt="a1")
    for step in (3, 4):
        second.log_metrics({"rollout/raw_reward": 0.1 * step}, step=step)

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.info.run_name == "tiny-run"
    assert run.data.tags["resume_count"] == "1"
    assert run.data.tags["slurm_job_ids"] == "11,12"
    assert run.data.tags["attempt_ids"] == "a0,a1"
    assert run.data.tags["git_sha"] == "0123abc" and run.data.tags["engine"] == "local"
    assert run.data.params == params
    assert len(client.search_runs([run.info.experiment_id])) == 1
    history = client.get_metric_history(run_id, "rollout/raw_reward")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval/aime/pass_at_16")) == [0, 1, 2]

    changed = {**params, "grpo.eps_clip": "0.3"}
    with pytest.raises(ValueError, match=r"param 'grpo.eps_clip' changed.*'0.2'.*'0.3'"):
        _open(mlflow_server, experiment, run_id=run_id, params=changed, job="13", attempt="a2")

    second.close("FINISHED")
    assert client.get_run(run_id).info.status == "FINISHED"


def test_artifacts(mlflow_server: str, tmp_path: Path) -> None:
    experiment = f"kimi-{uuid.uuid4().hex[:8]}"
    tracker, run_id = _open(mlflow_server, experiment, run_id=None, params={}, job="1", attempt="a0")
    for step in range(4):
        tracker.log_metrics(
            {"rollout/raw_reward": step / 4, "eval/gsm8k": step / 8, "eval/aime": step / 10}, step=step
        )
    rows = [
        {"prompt": "1+1?", "response": "\\boxed{2}", "reward": 1.0},
        {"prompt": "2+2?", "response": "5", "reward": 0.0, "truncated": True},
    ]
    tracker.log_table(rows, "eval/samples_0000003.json")
    tracker.log_table(rows, "eval/samples_0000003.json")  # a retried eval overwrites
    tracker.log_checkpoint_uri(3, "file:///runs/tiny/checkpoints/iter_0000003")
    tracker.log_artifact_text("recipe.yaml", "model:\n  name: tiny-kimi\n")
    assert tracker.log_curves_png() == ["plots/reward.png", "plots/eval.png"]
    tracker.log_metrics({"rollout/raw_reward": 1.0}, step=4)
    tracker.log_curves_png()  # refresh: same paths, overwritten

    client = MlflowClient(tracking_uri=mlflow_server)
    assert sorted(_artifact_paths(client, run_id)) == [
        "checkpoints/iter_0000003.json",
        "eval/samples_0000003.json",
        "plots/eval.png",
        "plots/reward.png",
        "recipe.yaml",
    ]
    local = Path(client.download_artifacts(run_id, "eval/samples_0000003.json", str(tmp_path)))
    table = json.loads(local.read_text())
    assert table["columns"] == ["prompt", "response", "reward", "truncated"]
    assert table["data"] == [["1+1?", "\\boxed{2}", 1.0, None], ["2+2?", "5", 0.0, True]]
    png = Path(client.download_artifacts(run_id, "plots/reward.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = client.get_run(run_id)
    assert run.data.tags["checkpoint.latest"].endswith("iter_0000003")
    assert run.data.tags["checkpoint.latest_rollout_id"] == "3"
    attached = RunTracker.attach(tracking_uri=mlflow_server, run_id=run_id)
    attached.log_metrics({"train/grad_norm": 1.5}, step=4)
    assert client.get_metric_history(run_id, "train/grad_norm")[0].value == 1.5
    tracker.close()


def test_errors(mlflow_server: str) -> None:
    with pytest.raises(ValueError, match="is not in"):
        _open(mlflow_server, "kimi-errors", run_id="0" * 32, params={}, job="1", attempt="a")
    tracker, _ = _open(mlflow_server, "kimi-errors", run_id=None, params={}, job="1", attempt="a")
    with pytest.raises(ValueError, match="metric 'x' must be a number"):
        tracker.log_metrics({"x": "high"}, step=0)
    with pytest.raises(ValueError, match="status must be one of"):
        tracker.close("DONE")
    with pytest.raises(ValueError, match="must end with .json"):
        tracker.log_table([], "samples.csv")
    with pytest.raises(RuntimeError, match="not open"):
        RunTracker().log_metrics({"x": 1.0}, step=0)
    tracker.close("KILLED")


# ----------------------------------------------------------------------------- local sqlite
def test_local_sqlite_store(tmp_path: Path, monkeypatch) -> None:
    """Without MLFLOW_TRACKING_URI: SQLite beside the run; artifacts beside the DB, not in cwd."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri(tmp_path / "run" / "mlflow.db")
    tracker, run_id = _open(uri, "local", run_id=None, params={"a": 1}, job="", attempt="a0")
    tracker.log_metrics({"rollout/raw_reward": 0.5}, step=0)
    tracker.log_curves_png()
    tracker.close()
    again, same = _open(uri, "local", run_id=run_id, params={"a": 1}, job="", attempt="a1")
    assert same == run_id
    assert (tmp_path / "run" / "mlflow.db").is_file()
    assert list((tmp_path / "run" / "mlartifacts").rglob("reward.png"))
    assert not (tmp_path / "mlruns").exists()
    assert MlflowClient(tracking_uri=uri).get_run(run_id).data.tags["resume_count"] == "1"
    again.close()


def test_background_metrics_are_written_before_any_read_and_none_is_lost(mlflow_server: str) -> None:
    """`background_metrics`: `log_metrics` returns before the write; a read or `close` through any
    tracker of the process sees every earlier write; a write that failed is written again by the
    next flush, and its error raised meanwhile (nothing dropped)."""
    tracker = RunTracker(background_metrics=True)
    tracker.open(tracking_uri=mlflow_server, experiment="kimi-background", run_name="bg", run_id=None,
                 params={}, tags={})
    for step in range(5):
        tracker.log_metrics({"rollout/raw_reward": step / 10, "perf/step_time": 1.0}, step=step)
    other = RunTracker.attach(tracking_uri=mlflow_server, run_id=tracker.run_id)  # another tracker, same process
    history = other.client.get_metric_history(tracker.run_id, "rollout/raw_reward")
    assert sorted((m.step, m.value) for m in history) == [(s, s / 10) for s in range(5)]

    direct = MlflowClient(mlflow_server)
    direct.delete_run(tracker.run_id)  # writes to a deleted run fail
    tracker.log_metrics({"rollout/raw_reward": 0.5}, step=5)  # returns: the failure comes later
    for _ in range(2):  # raised by every flush until it is written
        with pytest.raises(MlflowException):
            tracker.client  # noqa: B018 - the property flushes
    direct.restore_run(tracker.run_id)
    history = tracker.client.get_metric_history(tracker.run_id, "rollout/raw_reward")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4, 5]
    tracker.close()
