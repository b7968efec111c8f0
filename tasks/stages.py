"""Tasks of the job-shaped stages. Each calls one `kimi_core` function with the launcher of the
run's executor; each stage checks its own inputs' content, so a resumed run redoes nothing that is
current (Prefect's own cache key includes the flow-run id, so it is not used)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from kimi_core.runtime import jobs
from kimi_core.runtime.context import RunContext
from slurm.launcher import StageLauncher
from tasks.retry import transient_only


def _launcher(ctx: RunContext) -> StageLauncher:
    recipe = ctx.recipe()
    paths = ctx.paths(recipe)
    return StageLauncher(recipe=recipe, run_name=paths.run_name, logs=paths.logs)


@task(name="prepare_data", retries=2, retry_delay_seconds=[10, 60], timeout_seconds=4 * 3600,
      cache_policy=NO_CACHE, retry_condition_fn=transient_only)
def prepare_data(ctx: RunContext) -> dict[str, Any]:
    """Validate, deduplicate and cache the training and eval sets."""
    return jobs.prepare_data(ctx, _launcher(ctx))


@task(name="acquire_model", retries=2, retry_delay_seconds=[10, 60], timeout_seconds=4 * 3600,
      cache_policy=NO_CACHE, retry_condition_fn=transient_only)
def acquire_model(ctx: RunContext) -> dict[str, Any]:
    """Verify (production) or build (local) the actor's HF checkpoint."""
    return jobs.acquire_model(ctx, _launcher(ctx))


@task(name="convert_checkpoint", retries=2, retry_delay_seconds=[30, 120], timeout_seconds=12 * 3600,
      cache_policy=NO_CACHE, retry_condition_fn=transient_only)
def convert_checkpoint(ctx: RunContext, model: dict[str, Any]) -> dict[str, Any]:
    """Produce the reference / initial weights (HF -> torch_dist, INT4 -> BF16)."""
    return jobs.convert_checkpoint(ctx, _launcher(ctx), model)
