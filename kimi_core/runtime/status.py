"""Read-only views of a run: validation before anything runs, completion, and `kimi-grpo status`."""

from __future__ import annotations

from typing import Any

from kimi_core.runtime.context import RunContext
from kimi_core.recipe import RunPlan, plan_run
from kimi_core.run_state import Manifest, RunPaths, checkpoint_dir, latest_checkpoint


def validate(ctx: RunContext) -> RunPlan:
    """Load and check the recipe (raises `RecipeError`); return its plan."""
    recipe = ctx.recipe()
    ctx.paths(recipe)
    return plan_run(recipe)


def completed_run(ctx: RunContext) -> dict[str, Any] | None:
    """A summary when the run already reached its last rollout (so re-running does no work), else None."""
    recipe = ctx.recipe()
    paths = ctx.paths(recipe)
    if not paths.manifest.is_file():
        return None
    manifest = Manifest.load(paths)
    latest = latest_checkpoint(paths)
    if not manifest.finished or latest != recipe.rollout.num_rollout - 1:
        return None
    print(f"run {paths.run_name!r} is complete: {latest + 1} rollouts, latest checkpoint {checkpoint_dir(paths, latest)}")
    return {"run_name": paths.run_name, "latest_checkpoint": latest, "complete": True,
            "mlflow_run_id": manifest.mlflow_run_id, "tracking_uri": manifest.mlflow_tracking_uri, "skipped": True}


def run_status(paths: RunPaths) -> dict[str, Any]:
    """Stages, latest checkpoint, attempts and the MLflow run of an existing run."""
    manifest = Manifest.load(paths)
    latest = latest_checkpoint(paths)
    return {
        "run_name": paths.run_name,
        "run_dir": str(paths.run_dir),
        "finished": manifest.finished,
        "stages": {name: {"status": r.status, "finished_at": r.finished_at} for name, r in manifest.stages.items()},
        "latest_checkpoint": latest,
        "latest_checkpoint_dir": None if latest is None else str(checkpoint_dir(paths, latest)),
        "attempts": len(manifest.resume_history),
        "slurm_job_ids": manifest.slurm_job_ids,
        "ray_address": manifest.ray_address,
        "mlflow_run_id": manifest.mlflow_run_id,
        "mlflow_tracking_uri": manifest.mlflow_tracking_uri,
        "failures": manifest.failures[-5:],
    }
