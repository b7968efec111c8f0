"""`RunLedger`: a run's bookkeeping around stages and rollouts — manifest and MLflow run.

Shared by the Prefect flow (one ledger per task call; everything it needs is on disk) and the
sbatch fallback (one ledger for the whole run). It never holds tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import yaml

from kimi_core import stages
from kimi_core.engines import engine_name
from kimi_core.engines.base import ROLLOUT_METRICS_FILE, EngineInputs, TrackingTarget
from kimi_core.recipe import plan_run, recipe_hash, recipe_to_dict
from kimi_core.run_state import checkpoint_dir, latest_checkpoint
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.loop import RolloutLoop, Session, StopRequest
from kimi_core.runtime.manifest import Manifest
from kimi_core.runtime.progress import Progress, console
from kimi_core.runtime.recording import STEP_TIME_METRIC, RunRecorder
from kimi_core.runtime.tracking import RunTracker, git_sha
from kimi_core.runtime.tracking_uri import tracking_uri_for

#: The recipe field that says how far a run goes: it may grow when a run is extended
#: (`--num-rollout`), so MLflow gets it as a tag, not as a param (params cannot change).
RUN_LENGTH_KEY = "rollout.num_rollout"


def cache_key(*parts: Any) -> str:
    """A stable key of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class RunLedger:
    """The run's recipe, paths, plan, manifest and MLflow run."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.recipe = ctx.recipe()
        self.paths = ctx.paths(self.recipe).ensure()
        self.plan = plan_run(self.recipe)
        self.manifest = Manifest.load_or_create(self.paths, recipe_hash=recipe_hash(self.recipe))
        self._tracker: RunTracker | None = None

    # ---- stages --------------------------------------------------------------------------
    def stage(self, name: str, fn: Callable[[], dict[str, Any]], *, key: str) -> dict[str, Any]:
        """Run stage `name` and record its result. The stage itself checks the content of its
        inputs against its earlier output (source bytes, checkpoint shards), so an unchanged input
        returns at once with `cached: true` and a changed one is redone; the manifest records which."""
        started = time.perf_counter()
        result = fn()
        cached = bool(result.get("cached"))
        self.manifest.record_stage(name, cache_key=key, result=result, cached=cached)
        verdict = "inputs unchanged, earlier output reused" if cached else "done"
        console.print(f"stage {name}: {verdict} in {time.perf_counter() - started:.1f} s", markup=False)
        return result

    # ---- tracking ------------------------------------------------------------------------
    def tracking_uri(self) -> str:
        return tracking_uri_for(self.recipe, self.paths)

    @property
    def engine_name(self) -> str:
        """The engine the recipe runs on (the MLflow `engine` tag): `miles` on GPU, `local` on CPU."""
        return engine_name(self.recipe)

    @property
    def engine_logs_own_metrics(self) -> bool:
        """Whether the engine logs its metrics to the run itself (miles): it must know the MLflow
        run before it is built."""
        return self.engine_name == "miles"

    def engine_inputs(self, data: dict[str, Any], model: dict[str, Any]) -> EngineInputs:
        """The engine's inputs from the stage results (`convert_checkpoint`'s from the manifest) and,
        for a self-logging engine, the run's MLflow run (open it first: `open_tracking`)."""
        converted = self.manifest.stages.get("convert_checkpoint")
        tracking = None
        if self.engine_logs_own_metrics:
            tracker = self.tracker
            assert tracker.tracking_uri is not None
            tracking = TrackingTarget(tracking_uri=tracker.tracking_uri, experiment=self.recipe.tracking.experiment,
                                      run_id=tracker.run_id)
        result = converted.result if converted is not None and isinstance(converted.result, dict) else None
        return stages.engine_inputs(data, model, result, tracking=tracking)

    def open_tracking(self, *, attempt: int) -> RunTracker:
        """Create the run's MLflow run once; reopen it by id (from the manifest) on resume.

        Params are the flattened resolved recipe without its length (`rollout.num_rollout`, a tag),
        so a run extended with `--num-rollout` logs into the same MLflow run.
        """
        params = recipe_to_dict(self.recipe)
        params["rollout"] = {k: v for k, v in params["rollout"].items() if f"rollout.{k}" != RUN_LENGTH_KEY}
        tracker = RunTracker(background_metrics=True)  # the per-rollout metrics: off the loop's path
        run_id = tracker.open(
            tracking_uri=self.tracking_uri(), experiment=self.recipe.tracking.experiment,
            run_name=self.paths.run_name, run_id=self.manifest.mlflow_run_id, params=params,
            tags={"git_sha": git_sha(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))),
                  "engine": self.engine_name, "recipe_hash": self.manifest.recipe_hash,
                  RUN_LENGTH_KEY: str(self.recipe.rollout.num_rollout)},
            slurm_job_ids=self.manifest.all_slurm_job_ids,
            attempt_id=f"{self.paths.run_name}-{attempt}",
        )
        if self.manifest.mlflow_run_id is None:
            tracker.log_artifact_text("recipe.yaml", yaml.safe_dump(recipe_to_dict(self.recipe), sort_keys=False))
        self.manifest.update(mlflow_run_id=run_id, mlflow_tracking_uri=tracker.tracking_uri, finished=False)
        self._tracker = tracker
        return tracker

    @property
    def tracker(self) -> RunTracker:
        if self._tracker is None:
            if self.manifest.mlflow_run_id is None or self.manifest.mlflow_tracking_uri is None:
                raise RuntimeError("the MLflow run is not open yet")
            self._tracker = RunTracker.attach(tracking_uri=self.manifest.mlflow_tracking_uri,
                                              run_id=self.manifest.mlflow_run_id, background_metrics=True)
        return self._tracker

    def tracking_running(self) -> bool:
        """Whether an attempt holds the run's MLflow run open (RUNNING)."""
        return self.manifest.mlflow_run_id is not None and self.tracker.status() == "RUNNING"

    def close_tracking(self, status: str) -> None:
        """End the MLflow run with `status` if an attempt holds it open (RUNNING). A run that is
        already FINISHED stays so: an attempt that fails before reopening it (say, extending a
        finished run with a bad override) never marks the finished run FAILED."""
        if self.tracking_running():
            self.tracker.close(status)

    def logged_steps(self, key: str) -> set[int]:
        """Steps at which `key` was already logged (a redone rollout after a crash is not logged twice)."""
        history = self.tracker.client.get_metric_history(self.tracker.run_id, key)
        return {m.step for m in history}

    def logged_eval_steps(self) -> set[int]:
        """Steps at which the first eval set's score was already logged."""
        names = [f"eval/{d.name}" for d in self.recipe.eval.datasets]
        return self.logged_steps(names[0]) if names else set()

    def logged_rollouts(self, start: int) -> set[int]:
        """Rollouts whose metrics MLflow holds, after back-filling those the checkpoint before `start`
        holds but MLflow does not (an engine saved them, then its orchestrator died before logging).

        A rollout counts as logged when the driver logged it: `rollout/raw_reward` comes in the same
        batch for the local engine, but a self-logging engine (miles) logs that key itself, before
        its rollout trains, so there the driver's own `perf/step_time` decides."""
        logged = self.logged_steps(STEP_TIME_METRIC if self.engine_logs_own_metrics else "rollout/raw_reward")
        saved = checkpoint_dir(self.paths, start - 1) / ROLLOUT_METRICS_FILE if start > 0 else None
        if saved is not None and saved.is_file():
            entries = {int(rollout_id): metrics for rollout_id, metrics in json.loads(saved.read_text()).items()}
            keys = sorted({key for metrics in entries.values() for key in metrics})
            filled = self.logged_steps(keys[0]) if keys else set()  # back-filled by an earlier resume
            for rollout_id, metrics in entries.items():
                if rollout_id not in logged and rollout_id not in filled and metrics:
                    self.tracker.log_metrics(metrics, step=rollout_id)
                logged.add(rollout_id)
        return logged

    def rollout_loop(self, session: Session, *, start: int, stop: StopRequest | None = None) -> RolloutLoop:
        """The run's rollout loop from `start`: its evals owed, what MLflow already holds (logged
        once), failures recorded in the manifest, results to the MLflow run and the progress line."""
        logged_evals = self.logged_eval_steps()
        return RolloutLoop(
            session=session, plan=self.plan, start=start, stop=stop or StopRequest(),
            recorder=RunRecorder(self.tracker, Progress(start=start, end=self.plan.num_rollout),
                                 train_steps_per_rollout=self.plan.steps_per_rollout),
            pending_evals=RolloutLoop.evals_owed(self.plan, start=start, logged_evals=logged_evals),
            logged_rollouts=self.logged_rollouts(start), logged_evals=logged_evals,
            failures=lambda stage, rollout_id, error: self.manifest.record_failure(
                stage=stage, rollout_id=rollout_id, error=error),
        )

    def start_rollout_id(self) -> int:
        latest = latest_checkpoint(self.paths)
        return 0 if latest is None else latest + 1
