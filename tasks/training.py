"""Tasks of training: cluster bring-up, the engine session, one rollout, one eval, finish, abort."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from kimi_core.engines.base import EvalResult, RolloutResult
from kimi_core.runtime import flow_steps
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.flow_steps import ClusterInfo, SessionHandle
from kimi_core.runtime.ray_slurm import RayFiles
from kimi_core.runtime.status import RunSummary
from slurm.ray_job import RaySlurmJobs, SlurmQueue
from tasks.retry import transient_only


@task(name="bring_up_cluster", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=transient_only)
def bring_up_cluster(ctx: RunContext) -> ClusterInfo:
    """A Ray cluster for the run: a loopback head, or the run's Ray job on Slurm.

    No task timeout: a Ray job may wait in the Slurm queue without limit (its readiness wait, once
    it runs, is bounded); the local head runs on a worker thread beside the stages, where a Prefect
    timeout cannot interrupt a wait.
    """
    recipe = ctx.recipe()
    if recipe.cluster.executor != "slurm":
        return flow_steps.bring_up_cluster(ctx)
    files = RayFiles.of(ctx.paths(recipe).run_dir)
    submitter = RaySlurmJobs.for_run(recipe, run_name=ctx.name(recipe), run_dir=ctx.paths(recipe).run_dir,
                                     deadline_mark_prefix=files.deadline_prefix)
    return flow_steps.bring_up_cluster(ctx, submitter=submitter, queue=SlurmQueue())


@task(name="open_session", retries=1, retry_delay_seconds=10, timeout_seconds=1800,
      cache_policy=NO_CACHE, retry_condition_fn=transient_only)
def open_session(ctx: RunContext, cluster: ClusterInfo, data: dict[str, Any], model: dict[str, Any]) -> SessionHandle:
    """Create or re-attach to the detached engine actor; it loads the latest complete checkpoint."""
    return flow_steps.open_session(ctx, cluster, data, model)


@task(name="train_rollout", task_run_name="train_rollout-{rollout_id}", retries=2, retry_delay_seconds=5,
      timeout_seconds=6 * 3600, cache_policy=NO_CACHE, retry_condition_fn=transient_only)
def train_rollout(handle: SessionHandle, rollout_id: int) -> RolloutResult:
    """generate -> reward -> filter -> advantages -> train -> save if due -> push weights; log metrics."""
    return flow_steps.train_rollout(handle, rollout_id)


@task(name="evaluate", task_run_name="evaluate-{rollout_id}", retries=2, retry_delay_seconds=5,
      timeout_seconds=6 * 3600, cache_policy=NO_CACHE, retry_condition_fn=transient_only)
def evaluate(handle: SessionHandle, rollout_id: int) -> EvalResult:
    """Eval sets, n samples each; log `eval/<name>` metrics and sample generations."""
    return flow_steps.evaluate(handle, rollout_id)


@task(name="finish", retries=1, retry_delay_seconds=5, timeout_seconds=600, cache_policy=NO_CACHE,
      retry_condition_fn=transient_only)
def finish(handle: SessionHandle) -> RunSummary:
    """Close the MLflow run, stop the engine and release the cluster."""
    return flow_steps.finish(handle)


@task(name="abort", retries=0, timeout_seconds=300, cache_policy=NO_CACHE)
def abort(ctx: RunContext, handle: SessionHandle | None, status: str) -> None:
    """The run stopped on an error: end the MLflow run with `status`, stop the engine and the local Ray head."""
    on_slurm = ctx.recipe().cluster.executor == "slurm"
    flow_steps.abort(ctx, handle, status, queue=SlurmQueue() if on_slurm else None)
