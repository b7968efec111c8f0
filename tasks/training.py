"""Tasks of the engine session: cluster bring-up, the session, one rollout, one eval, finish."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from kimi_core.runtime import flow_steps
from kimi_core.runtime.context import RunContext
from tasks.retry import transient_only


@task(name="bring_up_cluster", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=transient_only)
def bring_up_cluster(ctx: RunContext) -> dict[str, Any]:
    """A live Ray cluster for the run (reused when the manifest's is alive).

    No task timeout: the flow runs this on a worker thread beside the stages, where a Prefect timeout
    cannot interrupt a wait; the head's start has its own bounded readiness wait.
    """
    return rollouts.bring_up_cluster(ctx)


@task(name="open_session", retries=1, retry_delay_seconds=10, timeout_seconds=1800,
      cache_policy=NO_CACHE, retry_condition_fn=transient_only)
def open_session(ctx: RunContext, cluster: dict[str, Any], data: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """Create or re-attach to the detached engine actor; it loads the latest complete checkpoint."""
    return rollouts.open_session(ctx, cluster, data, model)


@task(name="train_rollout", task_run_name="train_rollout-{rollout_id}", retries=2, retry_delay_seconds=5,
      timeout_seconds=6 * 3600, cache_policy=NO_CACHE, retry_condition_fn=transient_only)
def train_rollout(ctx: RunContext, session: dict[str, Any], rollout_id: int) -> dict[str, float]:
    """generate -> reward -> filter -> advantages -> train -> save if due; log metrics."""
    return rollouts.train_rollout(ctx, session, rollout_id)


@task(name="evaluate", task_run_name="evaluate-{rollout_id}", retries=2, retry_delay_seconds=5,
      timeout_seconds=6 * 3600, cache_policy=NO_CACHE, retry_condition_fn=transient_only)
def evaluate(ctx: RunContext, session: dict[str, Any], rollout_id: int) -> dict[str, float]:
    """Eval sets, n samples each; log `eval/<name>` metrics and sample generations."""
    return rollouts.evaluate(ctx, session, rollout_id)


@task(name="finish", retries=1, retry_delay_seconds=5, timeout_seconds=600, cache_policy=NO_CACHE,
      retry_condition_fn=transient_only)
def finish(ctx: RunContext, session: dict[str, Any] | None) -> dict[str, Any]:
    """Close the MLflow run, stop the engine and release the cluster."""
    return rollouts.finish(ctx, session)


@task(name="abort", retries=0, timeout_seconds=300, cache_policy=NO_CACHE)
def abort(ctx: RunContext, session: dict[str, Any] | None, status: str) -> None:
    """The run stopped on an error: mark the MLflow run `status`, stop the engine and the local Ray head."""
    rollouts.abort(ctx, session, status)
