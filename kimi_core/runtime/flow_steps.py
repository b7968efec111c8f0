"""Cluster bring-up, the engine session and the per-rollout calls, as the flow's tasks run them.

Each function takes the `RunContext` plus small dicts and is safe to call again after a failure:
bring-up reuses a live cluster, the session re-attaches by name, a retried rollout returns the
result the session already holds, and metrics already logged for a rollout are not logged twice.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from kimi_core.engines.base import EngineInputs
from kimi_core.runtime.failures import PermanentFailure, SessionLost
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.ledger import Progress, RunDriver, console
from kimi_core.runtime.ray_local import RayHead, free_port, is_alive, short_temp_dir, start_local_ray_head, stop_local_ray_head, worker_port_range

NAMESPACE = "kimi-grpo"


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
    started = time.perf_counter()
    low, high = worker_port_range()
    head = start_local_ray_head(temp_dir=short_temp_dir(), port=free_port(), num_cpus=2,
                                object_store_memory=256 * 1024**2, min_worker_port=low, max_worker_port=high)
    result = {"address": head.address, "head": dataclasses.asdict(head)}
    driver.manifest.record_stage("bring_up_cluster", cache_key=head.address, result=result)
    driver.manifest.update(ray_address=head.address)
    console.print(f"ray head at {head.address}: started in {time.perf_counter() - started:.1f} s", markup=False)
    return result


@dataclasses.dataclass
class _Live:
    """What `open_session` leaves for the rollout and eval calls of this process: the run's driver
    (recipe, paths, open MLflow run), the actor handle, the progress line and the steps logged."""

    address: str
    driver: RunDriver
    actor: Any
    progress: Progress
    logged: dict[str, set[int]]


_live: dict[RunContext, _Live] = {}


def open_session(ctx: RunContext, cluster: dict[str, Any], data: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """Open the engine actor and the MLflow run; return where the session starts."""
    import ray

    from kimi_core.runtime.session import attach_session, engine_threads

    started, threads = time.perf_counter(), engine_threads()
    driver = RunDriver(ctx)
    inputs = EngineInputs(train_data=data["train"]["path"],
                          eval_data={name: e["path"] for name, e in data["eval"].items()},
                          initial_checkpoint=model["hf_checkpoint"])
    actor, reattached = attach_session(address=cluster["address"], namespace=NAMESPACE, ctx=ctx, inputs=inputs,
                                       num_threads=threads)
    starting = actor.start.remote()  # the engine loads its checkpoint while the MLflow run opens
    start = driver.start_rollout_id()
    attempt = driver.manifest.begin_attempt(reason="start" if start == 0 and not driver.manifest.resume_history else "resume",
                                            start_rollout_id=start)
    tracker = driver.open_tracking(attempt=attempt, engine="local")
    start = ray.get(starting)
    driver.manifest.set_start_rollout(start)
    books = driver.resume_bookkeeping(start)
    _live[ctx] = _Live(address=cluster["address"], driver=driver, actor=actor,
                       progress=Progress(start=start, end=driver.recipe.rollout.num_rollout),
                       logged={"rollout": books["rollouts"], "eval": books["evals"]})
    console.print(f"engine session {'re-attached' if reattached else 'opened'} at rollout {start} "
                  f"in {time.perf_counter() - started:.1f} s", markup=False)
    return {"start": start, "address": cluster["address"], "mlflow_run_id": tracker.run_id, "reattached": reattached,
            "pending_evals": books["pending_evals"]}


def _session(ctx: RunContext, session: dict[str, Any]) -> _Live:
    """The live session this process opened; in another process (a task run elsewhere) it is
    rebuilt from disk and the actor looked up by name."""
    live = _live.get(ctx)
    if live is not None and live.address == session["address"]:
        return live
    driver = RunDriver(ctx)
    live = _Live(address=session["address"], driver=driver, actor=_actor(ctx, driver, session),
                 progress=Progress(start=session["start"], end=driver.recipe.rollout.num_rollout),
                 logged={"rollout": driver.logged_steps("rollout/raw_reward"), "eval": driver.logged_eval_steps()})
    _live[ctx] = live
    return live


def _actor(ctx: RunContext, driver: RunDriver, session: dict[str, Any]) -> Any:
    from kimi_core.runtime.session import get_session

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
    started = time.perf_counter()
    live = _session(ctx, session)
    result = _call(live.driver, "train_rollout", rollout_id, live.actor.train_rollout.remote(rollout_id))
    live.driver.record_rollout(rollout_id, result, step_time=time.perf_counter() - started,
                               skip_metrics=rollout_id in live.logged["rollout"])
    live.logged["rollout"].add(rollout_id)
    live.progress.rollout(rollout_id, result["metrics"])
    return result["metrics"]


def evaluate(ctx: RunContext, session: dict[str, Any], rollout_id: int) -> dict[str, float]:
    """Evaluate the current policy; log eval metrics and the sample table."""
    live = _session(ctx, session)
    result = _call(live.driver, "evaluate", rollout_id, live.actor.evaluate.remote(rollout_id))
    live.driver.record_eval(rollout_id, result, skip_metrics=rollout_id in live.logged["eval"])
    live.logged["eval"].add(rollout_id)
    live.progress.eval(rollout_id, result["metrics"])
    return result["metrics"]


def _release(ctx: RunContext, driver: RunDriver, session: dict[str, Any] | None) -> None:
    """Stop the engine actor and the run's local Ray head (by pid); record the head as stopped."""
    import ray

    _live.pop(ctx, None)
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


def finish(ctx: RunContext, session: dict[str, Any] | None) -> dict[str, Any]:
    """Close the MLflow run, stop the engine actor and the run's local Ray head (by pid)."""
    driver = RunDriver(ctx)
    latest = driver.start_rollout_id() - 1
    complete = latest == driver.recipe.rollout.num_rollout - 1
    driver.tracker.log_curves_png()
    driver.tracker.close("FINISHED" if complete else "KILLED")
    _release(ctx, driver, session)
    driver.manifest.update(finished=complete)
    return {"run_name": driver.paths.run_name, "latest_checkpoint": latest, "complete": complete,
            "mlflow_run_id": driver.manifest.mlflow_run_id, "tracking_uri": driver.manifest.mlflow_tracking_uri}


def abort(ctx: RunContext, session: dict[str, Any] | None, status: str = "FAILED") -> None:
    """After a failure that stops the flow: mark the MLflow run `status` and release the local cluster,
    so that no Ray head or engine process outlives the run. Checkpoints and the manifest stay: the
    same command resumes once the cause is fixed."""
    driver = RunDriver(ctx)
    if driver.manifest.mlflow_run_id is not None:
        driver.tracker.close(status)
    _release(ctx, driver, session)
