"""The flow's engine-side steps: cluster bring-up, the session, one rollout, one eval, finish.

The Prefect tasks in `tasks/training.py` call these one by one; each is safe to call again after a
failure: bring-up records its head before waiting for it, the session re-attaches by name, a
retried rollout returns the result the session already holds, and the rollout loop logs each
metric once. What the flow passes between steps is a frozen `SessionHandle`; the live objects
behind it (the run's ledger, MLflow client, actor handle and the loop) are kept in one named
registry, `LIVE`, so the tasks of one flow run reuse them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimi_core.engines.base import EvalResult, RolloutResult
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.ledger import RunLedger
from kimi_core.runtime.loop import RolloutLoop, Step
from kimi_core.runtime.progress import console
from kimi_core.runtime.ray_local import (
    LeaseKeeper,
    RayHead,
    free_port,
    ray_env,
    short_temp_dir,
    start_local_ray_head,
    stop_local_ray_head,
    worker_port_range,
)
from kimi_core.runtime.session import ActorOptions, ActorSession, attach_actor, engine_threads, lookup_actor
from kimi_core.runtime.status import RunSummary

NAMESPACE = "kimi-grpo"
BRING_UP = "bring_up_cluster"
#: Seconds after its owner stops touching the lease that a loopback head ends itself.
LOCAL_LEASE_S = 30.0
#: Seconds the engine may take to close (miles: dispose its rollout engines) before its actor is killed.
ENGINE_CLOSE_S = 120.0


@dataclass(frozen=True)
class ClusterInfo:
    """A Ray cluster for the run: the address drivers connect to, and the local head when we own one."""

    address: str
    head: RayHead | None = None


@dataclass(frozen=True)
class SessionHandle:
    """What the flow hands from `open_session` to the rollout and eval steps."""

    run: RunContext
    address: str
    start: int
    pending_evals: tuple[int, ...]
    mlflow_run_id: str
    reattached: bool


# ---- cluster ---------------------------------------------------------------------------------
def bring_up_cluster(ctx: RunContext) -> ClusterInfo:
    """A Ray head on loopback for the run. A head recorded by an earlier process of this run (a
    killed CLI, a crashed flow) is stopped first: one head per run, owned by the process that runs it."""
    ledger = RunLedger(ctx)
    if ledger.recipe.cluster.executor != "local":
        raise NotImplementedError(
            "bring_up_cluster on Slurm runs the rendered Ray-on-Slurm job (kimi-grpo render --what ray-up); "
            "the flow path for it is not wired yet: use `kimi-grpo sbatch` on a Slurm cluster"
        )
    release_recorded_head(ledger)
    started = time.perf_counter()
    low, high = worker_port_range()

    def record(head: RayHead) -> None:  # before the head is ready: a rerun finds it and stops it
        ledger.manifest.record_stage(BRING_UP, cache_key=head.address, status="starting",
                                     result={"address": head.address, "head": dataclasses.asdict(head)})

    # The head ends itself once this process stops touching its lease (a SIGKILLed CLI or flow).
    lease = LIVE.keep_lease(ledger.paths.run_dir / "ray" / "lease", lease_timeout_s=LOCAL_LEASE_S)
    head = start_local_ray_head(temp_dir=short_temp_dir(), port=free_port(), num_cpus=2,
                                object_store_memory=256 * 1024**2, min_worker_port=low, max_worker_port=high,
                                lease_path=lease, lease_timeout_s=LOCAL_LEASE_S, on_spawn=record)
    ledger.manifest.record_stage(BRING_UP, cache_key=head.address,
                                 result={"address": head.address, "head": dataclasses.asdict(head)})
    ledger.manifest.update(ray_address=head.address)
    console.print(f"ray head at {head.address}: started in {time.perf_counter() - started:.1f} s", markup=False)
    return ClusterInfo(address=head.address, head=head)


def release_recorded_head(ledger: RunLedger) -> None:
    """Stop the run's recorded local Ray head (by pid), if any of it is still running."""
    record = ledger.manifest.stages.get(BRING_UP)
    if record is None or not record.result or "head" not in record.result:
        return
    stop_local_ray_head(RayHead(**record.result["head"]))
    ledger.manifest.update(ray_address=None)
    ledger.manifest.record_stage(BRING_UP, cache_key="stopped", result=None, status="stopped")


# ---- the session -----------------------------------------------------------------------------
class LiveObjects:
    """The live objects of the runs this process drives — the one process-wide registry.

    - The Ray connection (`ray.init` is per process), and the address it is connected to.
    - Rollout loops by session handle: a task called again in the same process (the next rollout,
      a retry) reuses the ledger, MLflow client and actor handle; a task in another process
      rebuilds them from the run directory and MLflow.
    - Lease keepers by lease file: this process touches the lease of every Ray head it brought up
      for as long as it lives.
    """

    def __init__(self) -> None:
        self._loops: dict[SessionHandle, RolloutLoop] = {}
        self._leases: dict[Path, LeaseKeeper] = {}
        self._ray_address: str | None = None
        self._lock = threading.Lock()

    def connect(self, address: str) -> None:
        """Connect this process to the Ray cluster at `address` as a driver; a process connected to
        another address (an earlier head of the run) disconnects first."""
        import ray  # noqa: PLC0415 - Ray only in the processes that talk to the cluster
        from ray._private import ray_constants  # noqa: PLC0415

        with self._lock:
            if ray.is_initialized():
                if self._ray_address == address:
                    return
                ray.shutdown()
            if address.startswith("127.0.0.1:"):
                # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; when it is on (the Linux
                # default) a driver swaps 127.0.0.1 for the machine's address and never reaches a
                # loopback-only head.
                os.environ.update({k: v for k, v in ray_env().items() if k.startswith("RAY_")})
                ray_constants.ENABLE_RAY_CLUSTER = False
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.ERROR)
            self._ray_address = address

    def disconnect(self) -> None:
        import ray  # noqa: PLC0415 - see connect

        with self._lock:
            if ray.is_initialized():
                ray.shutdown()
            self._ray_address = None

    def put(self, handle: SessionHandle, loop: RolloutLoop) -> None:
        with self._lock:
            self._loops = {handle: loop}  # one live session per process

    def get(self, handle: SessionHandle) -> RolloutLoop:
        with self._lock:
            loop = self._loops.get(handle)
        if loop is None:
            loop = _rebuild(handle)
            self.put(handle, loop)
        return loop

    def drop(self, run: RunContext) -> None:
        with self._lock:
            self._loops = {h: loop for h, loop in self._loops.items() if h.run != run}

    def keep_lease(self, path: Path, *, lease_timeout_s: float) -> Path:
        """Start touching the lease at `path` (once per path per process); return the path."""
        with self._lock:
            if path not in self._leases:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._leases[path] = LeaseKeeper(path, lease_timeout_s=lease_timeout_s).start()
        return path


LIVE = LiveObjects()


def open_session(ctx: RunContext, cluster: ClusterInfo, data: dict[str, Any], model: dict[str, Any]) -> SessionHandle:
    """Open (or re-attach to) the engine actor and the MLflow run; return where the session starts."""
    started = time.perf_counter()
    ledger = RunLedger(ctx)
    LIVE.connect(cluster.address)
    first = ledger.start_rollout_id()
    attempt = ledger.manifest.begin_attempt(
        reason="start" if first == 0 and not ledger.manifest.resume_history else "resume", start_rollout_id=first)
    # A self-logging engine (miles) is built with the MLflow run it logs into: open the run first.
    # The local engine loads its checkpoint while the run opens.
    tracker = ledger.open_tracking(attempt=attempt) if ledger.engine_logs_own_metrics else None
    actor, reattached = attach_actor(namespace=NAMESPACE, ctx=ctx, inputs=ledger.engine_inputs(data, model),
                                     options=ActorOptions.for_recipe(ledger.recipe), num_threads=engine_threads())
    starting = actor.start.remote()
    if tracker is None:
        tracker = ledger.open_tracking(attempt=attempt)
    start: int = ActorSession.get(starting, "open_session")
    ledger.manifest.set_start_rollout(start)
    loop = ledger.rollout_loop(ActorSession(actor), start=start)
    handle = SessionHandle(run=ctx, address=cluster.address, start=start, pending_evals=loop.pending_evals,
                           mlflow_run_id=tracker.run_id, reattached=reattached)
    LIVE.put(handle, loop)
    console.print(f"engine session {'re-attached' if reattached else 'opened'} at rollout {start} "
                  f"in {time.perf_counter() - started:.1f} s", markup=False)
    return handle


def _rebuild(handle: SessionHandle) -> RolloutLoop:
    ledger = RunLedger(handle.run)
    LIVE.connect(handle.address)
    loop = ledger.rollout_loop(ActorSession(lookup_actor(ledger.paths.run_name, namespace=NAMESPACE)),
                               start=handle.start)
    loop.pending_evals = handle.pending_evals
    return loop


def rollout_steps(handle: SessionHandle) -> Iterator[Step]:
    """The steps of the session's rollout loop, decided one at a time."""
    return LIVE.get(handle).steps()


def train_rollout(handle: SessionHandle, rollout_id: int) -> RolloutResult:
    """Run one rollout in the engine session (saving when the loop says so); log it once."""
    return LIVE.get(handle).train(rollout_id)


def evaluate(handle: SessionHandle, rollout_id: int) -> EvalResult:
    """Evaluate the current policy; log the eval metrics once and the sample table."""
    return LIVE.get(handle).evaluate(rollout_id)


# ---- the end ---------------------------------------------------------------------------------
def finish(handle: SessionHandle) -> RunSummary:
    """Close the engine, stop its actor and the run's local Ray head (by pid), then end the MLflow run.

    The MLflow status is set last: miles' processes attach to the run and an exit hook of theirs
    may end it (FINISHED) as they go, so our terminal status must come after they are gone."""
    ledger = RunLedger(handle.run)
    latest = ledger.start_rollout_id() - 1
    complete = latest == ledger.recipe.rollout.num_rollout - 1
    ledger.tracker.log_curves_png()
    _release(ledger, handle)
    ledger.tracker.close("FINISHED" if complete else "KILLED")
    ledger.manifest.update(finished=complete)
    return RunSummary(run_name=ledger.paths.run_name, latest_checkpoint=latest, complete=complete,
                      mlflow_run_id=ledger.manifest.mlflow_run_id, tracking_uri=ledger.manifest.mlflow_tracking_uri)


def abort(ctx: RunContext, handle: SessionHandle | None, status: str = "FAILED") -> None:
    """After a failure that stops the flow: release the engine and the local cluster, so that no Ray
    head or engine process outlives the run, then end the MLflow run with `status` if this attempt
    had reopened it (decided before the engine's processes end: see `finish`). Checkpoints and the
    manifest stay: the same command resumes once the cause is fixed."""
    ledger = RunLedger(ctx)
    reopened = ledger.tracking_running()
    _release(ledger, handle)
    if reopened:
        ledger.tracker.close(status)


def _release(ledger: RunLedger, handle: SessionHandle | None) -> None:
    """Close the engine (miles disposes its SGLang engines), stop its actor and the run's local Ray
    head (by pid); record the head as stopped."""
    import ray  # noqa: PLC0415 - only processes that talk to the cluster import Ray

    LIVE.drop(ledger.ctx)
    if handle is not None and ray.is_initialized():
        try:
            actor = lookup_actor(ledger.paths.run_name, namespace=NAMESPACE)
            try:
                ray.get(actor.close.remote(), timeout=ENGINE_CLOSE_S)
            except Exception as exc:  # a broken or hung engine: the kill below ends it
                console.print(f"engine not closed cleanly ({type(exc).__name__}: {exc}); stopping its actor",
                              markup=False)
            ray.kill(actor)
        except Exception as exc:
            console.print(f"engine actor not stopped ({type(exc).__name__}: {exc}); its Ray head is stopped next",
                          markup=False)
    LIVE.disconnect()
    release_recorded_head(ledger)
