"""Read-only views of a run: the checks before anything runs, completion, and `kimi-grpo status`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kimi_core.engines import engine_unavailable
from kimi_core.recipe import RecipeError, RunPlan, plan_run, recipe_hash
from kimi_core.run_state import RunPaths, checkpoint_dir, latest_checkpoint
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.failures import NotRunnableHere
from kimi_core.runtime.manifest import Manifest
from kimi_core.runtime.tracking_uri import tracking_uri_for


@dataclass(frozen=True)
class RunSummary:
    """How the run stands when the flow returns."""

    run_name: str
    latest_checkpoint: int | None
    complete: bool
    mlflow_run_id: str | None
    tracking_uri: str | None
    skipped: bool = False


def preflight(ctx: RunContext) -> RunPlan:
    """Load and check the recipe (raises `RecipeError`), then check that this install can run it
    (raises `NotRunnableHere`) — before any job is submitted. Returns the plan."""
    recipe = ctx.recipe()
    paths = ctx.paths(recipe)
    if paths.manifest.is_file() and (started := Manifest.load(paths).recipe_hash) != recipe_hash(recipe):
        raise RecipeError(ctx.recipe_path, [
            f"run {paths.run_name!r} was started with another recipe (hash {started}, this one {recipe_hash(recipe)}): "
            "resume it with the original recipe and overrides (only --num-rollout may change), or choose a new "
            "--run-name"])
    missing = engine_unavailable(recipe)
    if missing is not None:
        raise NotRunnableHere(missing)
    tracking_uri_for(recipe, paths)  # several GPU nodes need an MLflow server
    return plan_run(recipe)


def completed_run(ctx: RunContext) -> RunSummary | None:
    """A summary when the run already reached its last rollout (so re-running does no work), else None."""
    recipe = ctx.recipe()
    paths = ctx.paths(recipe)
    if not paths.manifest.is_file():
        return None
    manifest = Manifest.load(paths)
    latest = latest_checkpoint(paths)
    if not manifest.finished or latest is None or latest != recipe.rollout.num_rollout - 1:
        return None
    print(f"run {paths.run_name!r} is complete: {latest + 1} rollouts, latest checkpoint {checkpoint_dir(paths, latest)}")
    return RunSummary(run_name=paths.run_name, latest_checkpoint=latest, complete=True,
                      mlflow_run_id=manifest.mlflow_run_id, tracking_uri=manifest.mlflow_tracking_uri, skipped=True)


def run_status(paths: RunPaths) -> dict[str, Any]:
    """Stages, latest checkpoint, attempts and the MLflow run of an existing run."""
    manifest = Manifest.load(paths)
    latest = latest_checkpoint(paths)
    return {
        "run_name": paths.run_name,
        "run_dir": str(paths.run_dir),
        "finished": manifest.finished,
        "stages": {name: {"status": r.status + (" (inputs unchanged)" if r.cached else ""), "finished_at": r.finished_at}
                   for name, r in manifest.stages.items()},
        "latest_checkpoint": latest,
        "latest_checkpoint_dir": None if latest is None else str(checkpoint_dir(paths, latest)),
        "attempts": len(manifest.resume_history),
        "slurm_job_ids": manifest.all_slurm_job_ids,
        "ray_jobs": manifest.ray_jobs,
        "ray_address": manifest.ray_address,
        "mlflow_run_id": manifest.mlflow_run_id,
        "mlflow_tracking_uri": manifest.mlflow_tracking_uri,
        "failures": manifest.failures[-5:],
    }
