"""`RunDriver`: the bookkeeping around stages and rollouts — manifest, MLflow, progress.

Shared by the Prefect flow (one driver per task call; everything it needs is on disk) and the
sbatch fallback (one driver for the whole run). It never holds tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import yaml
from rich.console import Console

from kimi_core.pipeline.context import RunContext
from kimi_core.recipe import plan_run, recipe_hash, recipe_to_dict
from kimi_core.run_state import Manifest, checkpoint_dir, latest_checkpoint
from kimi_core.tracking import RunTracker, git_sha, resolve_tracking_uri

console = Console(stderr=True, soft_wrap=True)
#: Wall seconds of one rollout as the orchestrator sees it, from the start of its step to just before
#: its metrics are logged; the metric's MLflow timestamp marks that end.
STEP_TIME_METRIC = "perf/step_time"


def cache_key(*parts: Any) -> str:
    """A stable content key of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_identity(path: str) -> list[Any]:
    """(size, mtime) of a local file, or the path itself for URLs (their content is hashed by the stage)."""
    local = path.removeprefix("file://")
    if "://" in local or not os.path.exists(local):
        return [path]
    stat = os.stat(local)
    return [local, stat.st_size, stat.st_mtime_ns]


class RunDriver:
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
        """Run `fn` unless the manifest holds a completed record of `name` with the same key."""
        done = self.manifest.stage_done(name, key)
        if done is not None:
            console.print(f"[dim]stage {name}: done earlier, skipped[/dim]")
            return done
        started = time.perf_counter()
        result = fn()
        self.manifest.record_stage(name, cache_key=key, result=result)
        console.print(f"stage {name}: done in {time.perf_counter() - started:.1f} s")
        return result

    # ---- tracking ------------------------------------------------------------------------
    def tracking_uri(self) -> str:
        configured = self.recipe.tracking.tracking_uri
        if configured and not os.environ.get("MLFLOW_TRACKING_URI"):
            return configured
        return resolve_tracking_uri(self.paths.mlflow_db)

    def open_tracking(self, *, attempt: int, engine: str) -> RunTracker:
        """Create the run's MLflow run once; reopen it by id (from the manifest) on resume."""
        tracker = RunTracker()
        run_id = tracker.open(
            tracking_uri=self.tracking_uri(), experiment=self.recipe.tracking.experiment,
            run_name=self.paths.run_name, run_id=self.manifest.mlflow_run_id,
            params=recipe_to_dict(self.recipe),
            tags={"git_sha": git_sha(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))),
                  "engine": engine, "recipe_hash": self.manifest.recipe_hash},
            slurm_job_ids=[j for attempt_ids in self.manifest.slurm_job_ids for j in attempt_ids],
            attempt_id=f"{self.paths.run_name}-{attempt}",
        )
        if self.manifest.mlflow_run_id is None:
            tracker.log_artifact_text("recipe.yaml", yaml.safe_dump(recipe_to_dict(self.recipe), sort_keys=False))
        self.manifest.update(mlflow_run_id=run_id, mlflow_tracking_uri=tracker.tracking_uri)
        self._tracker = tracker
        return tracker

    @property
    def tracker(self) -> RunTracker:
        if self._tracker is None:
            if self.manifest.mlflow_run_id is None or self.manifest.mlflow_tracking_uri is None:
                raise RuntimeError("the MLflow run is not open yet")
            self._tracker = RunTracker.attach(tracking_uri=self.manifest.mlflow_tracking_uri,
                                              run_id=self.manifest.mlflow_run_id)
        return self._tracker

    def logged_steps(self, key: str) -> set[int]:
        """Steps at which `key` was already logged (a redone rollout after a crash is not logged twice)."""
        history = self.tracker.client.get_metric_history(self.tracker.run_id, key)
        return {m.step for m in history}

    def logged_eval_steps(self) -> set[int]:
        """Steps at which the first eval set's score was already logged."""
        names = [f"eval/{d.name}" for d in self.recipe.eval.datasets]
        return self.logged_steps(names[0]) if names else set()

    # ---- rollouts ------------------------------------------------------------------------
    def record_rollout(self, rollout_id: int, result: dict[str, Any], *, step_time: float,
                       skip_metrics: bool = False) -> None:
        """Log the rollout's metrics plus `perf/step_time` (the orchestrator's wall seconds for the
        rollout, engine call and save included) at step = rollout_id; record its checkpoint URI."""
        if not skip_metrics:
            self.tracker.log_metrics({**result["metrics"], STEP_TIME_METRIC: step_time}, step=rollout_id)
        if result.get("checkpoint"):
            self.tracker.log_checkpoint_uri(rollout_id, result["checkpoint"])

    def record_eval(self, rollout_id: int, result: dict[str, Any], *, skip_metrics: bool = False) -> None:
        """Log the eval metrics and the sample table. The reward/eval PNG plots are drawn when the
        run (or the attempt) ends, not here: rendering them costs more than a rollout of the local recipe."""
        if not skip_metrics:
            self.tracker.log_metrics(result["metrics"], step=rollout_id)
        if result["samples"]:
            self.tracker.log_table(result["samples"], f"eval/samples_rollout_{rollout_id:07d}.json")

    def resume_bookkeeping(self, start: int) -> dict[str, Any]:
        """What a (re)started session owes MLflow: rollouts logged so far (after back-filling those
        saved by an engine whose orchestrator died before logging them) and evals still due."""
        from kimi_core.session import ROLLOUT_METRICS_FILE

        logged = self.logged_steps("rollout/raw_reward")
        if start > 0:
            saved = checkpoint_dir(self.paths, start - 1) / ROLLOUT_METRICS_FILE
            if saved.is_file():
                for rollout_id, metrics in json.loads(saved.read_text()).items():
                    if int(rollout_id) not in logged:
                        self.tracker.log_metrics(metrics, step=int(rollout_id))
                        logged.add(int(rollout_id))
        evals = self.logged_eval_steps()
        if start == 0:
            pending = [0] if self.plan.eval_before_train else []
        else:
            pending = [start - 1] if self.plan.is_eval_due(start - 1) and start - 1 not in evals else []
        return {"rollouts": logged, "evals": evals, "pending_evals": pending}

    def start_rollout_id(self) -> int:
        latest = latest_checkpoint(self.paths)
        return 0 if latest is None else latest + 1


class Progress:
    """One live line per rollout: reward, last eval, seconds per rollout, ETA."""

    def __init__(self, *, start: int, end: int):
        self.start, self.end = start, end
        self.started = time.perf_counter()
        self.last_eval = ""

    def eval(self, rollout_id: int, metrics: dict[str, float]) -> None:
        scores = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.count("/") == 1}
        self.last_eval = ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + f" (@{rollout_id})"
        console.print(f"eval @ rollout {rollout_id}: {self.last_eval}")

    def rollout(self, rollout_id: int, metrics: dict[str, float]) -> None:
        done = rollout_id + 1 - self.start
        per = (time.perf_counter() - self.started) / max(done, 1)
        eta = per * (self.end - rollout_id - 1)
        console.print(
            f"rollout {rollout_id + 1}/{self.end}  reward {metrics.get('rollout/raw_reward', float('nan')):.3f}"
            f"  | last eval {self.last_eval or '-'}  | {per:.1f} s/rollout  | ETA {eta:.0f} s"
        )
