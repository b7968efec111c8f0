"""Cluster bring-up, the engine session and the per-rollout calls, as the flow's tasks run them.

Each function takes the `RunContext` plus small dicts and is safe to call again after a failure:
bring-up reuses a live cluster, the session re-attaches by name, a retried rollout returns the
result the session already holds, and metrics already logged for a rollout are not logged twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kimi_core.engines.local import EngineInputs
from kimi_core.failures import PermanentFailure, SessionLost
from kimi_core.pipeline.context import RunContext
from kimi_core.pipeline.driver import Progress, RunDriver
from kimi_core.ray_local import RayHead, free_port, is_alive, short_temp_dir, start_local_ray_head, stop_local_ray_head, worker_port_range

NAMESPACE = "kimi-grpo"
_progress: dict[str, Progress] = {}
_logged: dict[str, dict[str, set[int]]] = {}


def bring_up_cluster(ctx: RunContext) -> dict[str, Any]:
    """A Ray cluster for the run: reuse the live one recorded in the manifest, else start one."""
    driver = RunDriver(ctx)
    if driver.recipe.cluster.executor != "local":
        raise NotImplementedError(
            "bring_up_cluster on Slurm runs the rendered Ray-on-Slurm job (kimi-grpo render --what ray-up); "
            "the flow path for it is not wired yet: use `kimi-grpo sbatch` on a Slurm cluster"
        )
    record = driver.manifest.stages.get("bring_up_cluster")
    if record is not None and record.result and is_alive(record.result["address"]):
        return record.result
    low, high = worker_port_range()
    head = start_local_ray_head(temp_dir=short_temp_dir(), port=free_port(), num_cpus=2,
                                object_store_memory=256 * 1024**2, min_worker_port=low, max_worker_port=high)
    result = {"address": head.address, "head": dataclasses.asdict(head)}
    driver.manifest.record_stage("bring_up_cluster", cache_key=head.address, result=result)
    driver.manifest.update(ray_address=head.address)
    return result


def open_session(ctx: RunContext, cluster: dict[str, Any], data: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """Open the MLflow run and the engine actor; return where the session starts."""
    from kimi_core.session import open_session as open_actor

    driver = RunDriver(ctx)
    start = driver.start_rollout_id()
    attempt = driver.manifest.begin_attempt(reason="start" if start == 0 and not driver.manifest.resume_history else "resume",
                                            start_rollout_id=start)
    tracker = driver.open_tracking(attempt=attempt, engine="local")
    inputs = EngineInputs(train_data=data["train"]["path"],
                          eval_data={name: e["path"] for name, e in data["eval"].items()},
                          initial_checkpoint=model["hf_checkpoint"])
    _, start, reattached = open_actor(address=cluster["address"], namespace=NAMESPACE, ctx=ctx, inputs=inputs,
                                      num_threads=2)
    driver.manifest.set_start_rollout(start)
    books = driver.resume_bookkeeping(start)
    run_key = driver.paths.run_name
    _logged[run_key] = {"rollout": books["rollouts"], "eval": books["evals"]}
    _progress[run_key] = Progress(start=start, end=driver.recipe.rollout.num_rollout)
    return {"start": start, "address": cluster["address"], "mlflow_run_id": tracker.run_id, "reattached": reattached,
            "pending_evals": books["pending_evals"]}


def _actor(ctx: RunContext, driver: RunDriver, session: dict[str, Any]) -> Any:
    from kimi_core.session import get_session

    try:
        return get_session(driver.paths.run_name, address=session["address"], namespace=NAMESPACE)
    except (ValueError, ConnectionError) as exc:
        raise SessionLost(f"the engine session of run {driver.paths.run_name!r} is gone: {exc}") from exc


def _call(driver: RunDriver, stage: str, rollout_id: int, remote_call: Any) -> dict[str, Any]:
    import ray
    import ray.exceptions as rex

    try:
        return ray.get(remote_call)
    except (rex.RayActorError, rex.ActorDiedError) as exc:
        raise SessionLost(f"{stage} {rollout_id}: the engine actor died: {exc}") from exc
    except rex.RayTaskError as exc:
        cause = exc.cause if exc.cause is not None else exc
        repeats = driver.manifest.record_failure(stage=stage, rollout_id=rollout_id,
                                                 error=f"{type(cause).__name__}: {cause}")
        if repeats >= 2:
            raise PermanentFailure(f"{stage} {rollout_id} failed twice the same way: {type(cause).__name__}: {cause}") from exc
        raise cause from exc


def train_rollout(ctx: RunContext, session: dict[str, Any], rollout_id: int) -> dict[str, float]:
    """Run one rollout in the engine session, log its metrics at step = rollout_id."""
    driver = RunDriver(ctx)
    actor = _actor(ctx, driver, session)
    result = _call(driver, "train_rollout", rollout_id, actor.train_rollout.remote(rollout_id))
    logged = _logged.setdefault(driver.paths.run_name, {"rollout": set(), "eval": set()})
    driver.record_rollout(rollout_id, result, skip_metrics=rollout_id in logged["rollout"])
    logged["rollout"].add(rollout_id)
    progress = _progress.get(driver.paths.run_name)
    if progress is not None:
        progress.rollout(rollout_id, result["metrics"])
    return result["metrics"]


def evaluate(ctx: RunContext, session: dict[str, Any], rollout_id: int) -> dict[str, float]:
    """Evaluate the current policy; log eval metrics, the sample table and the curves."""
    driver = RunDriver(ctx)
    actor = _actor(ctx, driver, session)
    result = _call(driver, "evaluate", rollout_id, actor.evaluate.remote(rollout_id))
    logged = _logged.setdefault(driver.paths.run_name, {"rollout": set(), "eval": set()})
    driver.record_eval(rollout_id, result, skip_metrics=rollout_id in logged["eval"])
    logged["eval"].add(rollout_id)
    progress = _progress.get(driver.paths.run_name)
    if progress is not None:
        progress.eval(rollout_id, result["metrics"])
    return result["metrics"]


def finish(ctx: RunContext, session: dict[str, Any] | None) -> dict[str, Any]:
    """Close the MLflow run, stop the engine actor and the run's local Ray head (by pid)."""
    import ray

    driver = RunDriver(ctx)
    latest = driver.start_rollout_id() - 1
    complete = latest == driver.recipe.rollout.num_rollout - 1
    driver.tracker.log_curves_png()
    driver.tracker.close("FINISHED" if complete else "KILLED")
    if session is not None:
        try:
            ray.kill(_actor(ctx, driver, session))
        except SessionLost:
            pass
    if ray.is_initialized():
        ray.shutdown()
    record = driver.manifest.stages.get("bring_up_cluster")
    if record is not None and record.result and "head" in record.result:
        stop_local_ray_head(RayHead(**record.result["head"]))
        driver.manifest.update(ray_address=None)
        driver.manifest.record_stage("bring_up_cluster", cache_key="stopped", result=None, status="stopped")
    driver.manifest.update(finished=complete)
    return {"run_name": driver.paths.run_name, "latest_checkpoint": latest, "complete": complete,
            "mlflow_run_id": driver.manifest.mlflow_run_id, "tracking_uri": driver.manifest.mlflow_tracking_uri}
