"""MLflow tracking for one training run (docs/design.md §10), through `MlflowClient` with explicit run ids.

One MLflow run per training run: created once, reopened by id on every resume (the id lives in
the run manifest). Params are the flattened resolved recipe, logged once and never changed.
Metrics use `step = rollout_id`. Checkpoints are recorded as URIs, never copied. No global
active-run state is used, so any process (flow, Ray actor) can log to the run by id.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
_BATCH = 100
_STATUSES = ("FINISHED", "FAILED", "KILLED")
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")


#: MLflow 3's UI opens an experiment without this tag in its GenAI view ("Evaluation runs"); a
#: model-training experiment opens on the runs table with the metric charts.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def git_sha(repo_dir: str | os.PathLike[str] = ".") -> str:
    """`git rev-parse HEAD` of `repo_dir`, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple)):
        text = json.dumps(list(value), sort_keys=True, default=str)
    else:
        text = json.dumps(value, default=str)  # bool -> true, None -> null, 0.1 -> 0.1
    if len(text) > MAX_PARAM_VALUE:
        marker = f"...[truncated, {len(text)} chars]"
        text = text[: MAX_PARAM_VALUE - len(marker)] + marker
    return text


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> `{"a.b.c": str}` for MLflow params.

    Lists/tuples become JSON; scalars JSON (`true`, `null`, `0.1`), strings as they are. Values
    longer than MLflow's 6000-char limit are truncated with a marker; keys over 250 chars raise.
    """
    flat: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
            continue
        if len(name) > MAX_KEY:
            raise ValueError(f"param key {name[:60]!r}... is longer than MLflow's {MAX_KEY} chars")
        flat[name] = _param_value(value)
    return flat


def sanitize_metric_name(name: str) -> str:
    """Make a metric name MLflow-safe: `@` -> `_at_` (pass@16 -> pass_at_16), other bad chars ->
    `_`."""
    return _BAD_NAME_CHARS.sub("_", name.replace("@", "_at_"))


def _append_csv(existing: str | None, new: Iterable[str]) -> str:
    items = [x for x in (existing or "").split(",") if x]
    for item in new:
        if item and item not in items:
            items.append(item)
    return ",".join(items)[-MAX_TAG_VALUE:]


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _MetricWriter:
    """This process's metric batches, written in order by one daemon thread off the caller's path.

    `flush` waits until every batch handed over so far is written; a batch whose write failed is
    written again there, once, in the caller's thread, and its error raised if it fails again (it
    stays queued for the next flush). Every `RunTracker` in the process flushes before it reads or
    ends a run (its `client`), so no reader here misses a write made before it; `atexit` flushes
    what is left when the process ends normally.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[MlflowClient, str, list[Metric]]] = queue.SimpleQueue()
        self._lock = threading.Condition()
        self._pending = 0
        self._failed: list[tuple[MlflowClient, str, list[Metric]]] = []
        self._thread: threading.Thread | None = None

    def submit(self, client: MlflowClient, run_id: str, batch: list[Metric]) -> None:
        with self._lock:
            retry = bool(self._failed)
        if retry:  # an earlier write failed: write it (or raise) before handing over more
            self.flush()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="mlflow-metrics", daemon=True)
                self._thread.start()
            self._pending += 1
        self._queue.put((client, run_id, batch))

    def flush(self) -> None:
        with self._lock:
            self._lock.wait_for(lambda: self._pending == 0)
            failed, self._failed = self._failed, []
        for i, (client, run_id, batch) in enumerate(failed):
            try:
                client.log_batch(run_id, metrics=batch)
            except Exception:
                with self._lock:
                    self._failed[:0] = failed[i:]
                raise

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            client, run_id, batch = item
            try:
                client.log_batch(run_id, metrics=batch)
            except Exception:  # kept for the next flush, which writes it again or raises
                with self._lock:
                    self._failed.append(item)
            finally:
                with self._lock:
                    self._pending -= 1
                    self._lock.notify_all()


_WRITER = _MetricWriter()
atexit.register(_WRITER.flush)


class RunTracker:
    """One MLflow run, addressed by id. `open(...)` creates or reopens it; `attach` only binds.

    With `background_metrics`, `log_metrics` hands its batches to this process's metric writer
    and returns at once (the flow's per-rollout logging: an SQLite `log_batch` is ~27 ms on a small
    machine, the largest per-rollout cost outside the engine). Reads and `close` go through
    `client`, which waits for every metric written so far in this process.
    """

    def __init__(self, *, background_metrics: bool = False) -> None:
        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self.tracking_uri: str | None = None
        self.background_metrics = background_metrics

    # ------------------------------------------------------------------ open / attach / close
    @classmethod
    def attach(cls, *, tracking_uri: str, run_id: str, background_metrics: bool = False) -> RunTracker:
        """Bind to an existing run (e.g. inside a Ray actor) without touching params or tags."""
        tracker = cls(background_metrics=background_metrics)
        tracker._bind(tracking_uri, run_id)
        tracker.client.get_run(run_id)  # fail early, with MLflow's message, if it is unknown
        return tracker

    def _bind(self, tracking_uri: str, run_id: str | None) -> None:
        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._run_id = run_id

    @property
    def client(self) -> MlflowClient:
        """The MLflow client, once every metric this process logged in the background is written."""
        _WRITER.flush()
        return self._bound_client()

    def _bound_client(self) -> MlflowClient:
        if self._client is None:
            raise RuntimeError("RunTracker is not open; call open() or RunTracker.attach()")
        return self._client

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            raise RuntimeError("RunTracker is not open; call open() or RunTracker.attach()")
        return self._run_id

    def open(
        self,
        *,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_id: str | None,
        params: Mapping[str, str],
        tags: Mapping[str, str],
        slurm_job_ids: Sequence[str] = (),
        attempt_id: str | None = None,
    ) -> str:
        """Create the run (when `run_id` is None) or reopen it by id; return the run id.

        `params` (flat or nested; see `flatten`) are logged once; on resume identical values are skipped and a
        changed value raises ValueError naming the param. Tags: the given ones (`git_sha`,
        `engine`, ...) plus `resume_count` (+1 per reopen, once per `attempt_id`),
        `slurm_job_ids` and `attempt_ids` (comma-separated, appended).
        """
        self._bind(tracking_uri, None)
        if run_id is None:
            run = self.client.create_run(
                self._experiment_id(experiment, tracking_uri), run_name=run_name
            )
            resume_count = 0
        else:
            run = self._reopen(run_id)
            seen = (run.data.tags.get("attempt_ids") or "").split(",")
            resume_count = int(run.data.tags.get("resume_count", "0"))
            if attempt_id is None or attempt_id not in seen:
                resume_count += 1
        self._run_id = run.info.run_id
        self._log_params_once(flatten(params), existing=run.data.params)
        all_tags = {
            **{k: str(v) for k, v in tags.items()},
            "resume_count": str(resume_count),
            "slurm_job_ids": _append_csv(run.data.tags.get("slurm_job_ids"), slurm_job_ids),
            "attempt_ids": _append_csv(run.data.tags.get("attempt_ids"), [attempt_id or ""]),
        }
        tag_list = [RunTag(k, v[:MAX_TAG_VALUE]) for k, v in all_tags.items()]
        for chunk in _chunks(tag_list, _BATCH):
            self.client.log_batch(self.run_id, tags=list(chunk))
        return self.run_id

    def _experiment_id(self, experiment: str, tracking_uri: str) -> str:
        """The experiment's id, created on first use and tagged as model training (once)."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = None
            if tracking_uri.startswith("sqlite:///"):  # keep artifacts beside the DB, not in cwd
                db = Path(tracking_uri[len("sqlite:///") :])
                location = (db.parent / "mlartifacts").as_uri()
            try:
                self.client.create_experiment(experiment, artifact_location=location)
            except MlflowException:  # created concurrently by another process
                pass
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                raise RuntimeError(f"MLflow experiment {experiment!r} could not be created in {tracking_uri}")
        if EXPERIMENT_KIND_TAG not in found.tags:
            self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return str(found.experiment_id)

    def _reopen(self, run_id: str) -> Any:
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            raise ValueError(
                f"MLflow run {run_id} (from the run manifest) is not in {self.tracking_uri}: {exc}"
            ) from exc
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        return run

    def _log_params_once(self, params: dict[str, str], *, existing: Mapping[str, str]) -> None:
        new: list[Param] = []
        for key, value in params.items():
            value = _param_value(value)
            if key not in existing:
                new.append(Param(key, value))
            elif existing[key] != value:
                raise ValueError(
                    f"param {key!r} changed for MLflow run {self.run_id}: logged {existing[key]!r}, "
                    f"now {value!r}; params cannot change on resume (start a new run instead)"
                )
        for chunk in _chunks(new, _BATCH):
            self.client.log_batch(self.run_id, params=list(chunk))

    def status(self) -> str:
        """The run's status as MLflow holds it (RUNNING, FINISHED, FAILED, KILLED)."""
        return str(self.client.get_run(self.run_id).info.status)

    def close(self, status: str = "FINISHED") -> None:
        """Mark the run terminated with `status` in FINISHED / FAILED / KILLED."""
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        self.client.set_terminated(self.run_id, status=status)

    # ------------------------------------------------------------------ logging
    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> dict[str, str]:
        """Log numeric metrics at `step` (= rollout_id); returns {given name: logged name}."""
        now = int(time.time() * 1000)
        entries, renamed = [], {}
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"metric {name!r} must be a number, got {type(value).__name__}")
            safe = sanitize_metric_name(name)
            renamed[name] = safe
            entries.append(Metric(safe, float(value), now, step))
        client = self._bound_client()
        for chunk in _chunks(entries, 1000):
            if self.background_metrics:
                _WRITER.submit(client, self.run_id, list(chunk))
            else:
                client.log_batch(self.run_id, metrics=list(chunk))
        return renamed

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set tags in one request."""
        tag_list = [RunTag(key, str(value)[:MAX_TAG_VALUE]) for key, value in tags.items()]
        for chunk in _chunks(tag_list, _BATCH):
            self.client.log_batch(self.run_id, tags=list(chunk))

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """Sample generations as a JSON table `{"columns": [...], "data": [[...], ...]}`.

        Re-logging the same `artifact_file` (a retried eval) overwrites it instead of appending.
        """
        if not artifact_file.endswith(".json"):
            raise ValueError(f"table artifact_file must end with .json, got {artifact_file!r}")
        columns: list[str] = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
        data = [[row.get(c) for c in columns] for row in rows]
        self.client.log_dict(self.run_id, {"columns": columns, "data": data}, artifact_file)

    def log_checkpoint_uri(self, rollout_id: int, uri: str) -> None:
        """Record a checkpoint by URI: tag `checkpoint.latest*` and `checkpoints/iter_*.json`."""
        record = {"rollout_id": rollout_id, "uri": uri}
        self.client.log_dict(self.run_id, record, f"checkpoints/iter_{rollout_id:07d}.json")
        self.set_tags({"checkpoint.latest": uri, "checkpoint.latest_rollout_id": str(rollout_id)})

    def log_artifact_text(self, name: str, text: str) -> None:
        """A text artifact (e.g. `recipe.yaml`, the resolved recipe)."""
        self.client.log_text(self.run_id, text, name)

    def log_curves_png(
        self,
        *,
        reward_metric: str = "rollout/raw_reward",
        eval_prefix: str = "eval/",
        artifact_dir: str = "plots",
    ) -> list[str]:
        """Plot reward and eval curves from the run's metric history as PNG artifacts.

        Writes `{artifact_dir}/reward.png` and `{artifact_dir}/eval.png` (overwritten on each
        call); a plot without data is skipped. Returns the artifact paths written.
        """
        names = list(self.client.get_run(self.run_id).data.metrics)
        plots = {
            "reward.png": [n for n in names if n == reward_metric],
            "eval.png": sorted(n for n in names if n.startswith(eval_prefix)),
        }
        written = []
        with tempfile.TemporaryDirectory() as tmp:
            for filename, keys in plots.items():
                if not keys:
                    continue
                path = Path(tmp) / filename
                self._plot(keys, path, title=filename.removesuffix(".png"))
                self.client.log_artifact(self.run_id, str(path), artifact_dir)
                written.append(f"{artifact_dir}/{filename}")
        return written

    def _plot(self, keys: Sequence[str], path: Path, *, title: str) -> None:
        from matplotlib.figure import Figure  # noqa: PLC0415 - matplotlib only when a run ends; no pyplot: no global state

        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.subplots()
        for key in keys:
            history = sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.step)
            ax.plot([m.step for m in history], [m.value for m in history], marker=".", label=key)
        ax.set_xlabel("rollout_id")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path)
