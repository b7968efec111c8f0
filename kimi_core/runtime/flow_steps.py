"""The flow's engine-side steps: cluster bring-up, the session, one rollout, one eval, finish.

The Prefect tasks in `tasks/training.py` call these one by one; each is safe to call again after a
failure: bring-up records its head before waiting for it, the session re-attaches by name, a
retried rollout returns the result the session already holds, and the rollout loop logs each
metric once. What the flow passes between steps is a frozen `SessionHandle`; the live objects
behind it (the run's ledger, MLflow client, actor handle and the loop) are kept in one named
registry, `LIVE`, so the tasks of one flow run reuse them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kimi_core.engines.base import EvalResult, RolloutResult
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.ledger import RunLedger
from kimi_core.runtime.local_head import BRING_UP, adopt_early, release_recorded_head, start_head
from kimi_core.runtime.loop import RolloutLoop, Step
from kimi_core.runtime.progress import console
from kimi_core.runtime.ray_local import RayHead, keep_lease, ray_env
from kimi_core.runtime.ray_slurm import (
    JobQueue,
    JobWatch,
    RayFiles,
    RayJobSubmitter,
    RayNodeSpec,
    cancel_and_wait_gone,
    check_versions,
    ray_node_main,
    read_ready,
    use_token,
    wait_ready,
)
from kimi_core.runtime.session import ActorOptions, ActorSession, attach_actor, engine_threads, lookup_actor
from kimi_core.runtime.status import RunSummary

NAMESPACE = "kimi-grpo"
#: Seconds a Ray Client keeps trying to get a dropped connection back before it reports the loss.
CLIENT_RECONNECT_GRACE_S = 10
#: Seconds the engine may take to close (miles: dispose its rollout engines) before its actor is killed.
ENGINE_CLOSE_S = 120.0


@dataclass(frozen=True)
class ClusterInfo:
    """A Ray cluster for the run: the address drivers connect to; the local head when we own one,
    or the Slurm job it lives in (and the queue that knows its state)."""

    address: str
    head: RayHead | None = None
    job_id: str | None = None
    queue: JobQueue | None = None


@dataclass(frozen=True)
class SessionHandle:
    """What the flow hands from `open_session` to the rollout and eval steps."""

    run: RunContext
    address: str
    start: int
    pending_evals: tuple[int, ...]
    mlflow_run_id: str
    reattached: bool
    ray_job_id: str | None = None
    queue: JobQueue | None = None

    def watch(self) -> Callable[[], None] | None:
        """The check between polls of an engine call: Slurm says whether the Ray job still runs."""
        return None if self.queue is None or self.ray_job_id is None else JobWatch(self.queue, self.ray_job_id)


# ---- cluster ---------------------------------------------------------------------------------
def on_slurm(ctx: RunContext) -> bool:
    """The run's Ray cluster is a Slurm job (a Slurm cluster profile)."""
    return ctx.recipe().cluster.executor == "slurm"


def progress(ctx: RunContext) -> int:
    """The first rollout not yet saved (the latest checkpoint + 1)."""
    return RunLedger(ctx).start_rollout_id()


def bring_up_cluster(ctx: RunContext, *, submitter: RayJobSubmitter | None = None,
                     queue: JobQueue | None = None) -> ClusterInfo:
    """A Ray cluster for the run: on loopback for the local executor; for a Slurm profile, the run's
    Ray job (`submitter`, `queue`: `slurm.ray_job`), reused while it runs and is ready."""
    ledger = RunLedger(ctx)
    if ledger.recipe.cluster.executor == "slurm":
        if submitter is None or queue is None:
            raise ValueError("a Slurm profile needs the Ray job submitter and the Slurm queue")
        return _bring_up_on_slurm(ledger, submitter, queue)
    return _bring_up_local(ledger)


def _bring_up_local(ledger: RunLedger) -> ClusterInfo:
    """A Ray head on loopback: the one `kimi-grpo run` started early for this run, else a new one."""
    head = adopt_early(ledger.paths.run_dir) or start_head(ledger.manifest, ledger.paths.run_dir, ledger.recipe)
    return ClusterInfo(address=head.address, head=head)


def _bring_up_on_slurm(ledger: RunLedger, submitter: RayJobSubmitter, queue: JobQueue) -> ClusterInfo:
    """Reuse the run's Ray job while it runs, is ready and has no deadline mark; else cancel what is
    left of the run's Ray jobs, wait until they have left the queue, submit a new one and wait."""
    recipe, files = ledger.recipe, RayFiles.of(ledger.paths.run_dir)
    spec = RayNodeSpec.for_recipe(recipe, ledger.paths.run_dir)
    if spec.token:
        files.ensure_token()
    keep_lease(files.lease, lease_timeout_s=recipe.cluster.ray.lease_s)  # before any job can read it
    current = ledger.manifest.ray_jobs[-1] if ledger.manifest.ray_jobs else None
    if current is not None and not files.deadline(current).exists() and queue.state(current) == "RUNNING":
        record = read_ready(files, current)
        if record is not None:
            check_versions(record)
            console.print(f"Ray job {current} is running: re-attaching at {record['address']}", markup=False)
            return ClusterInfo(address=str(record["address"]), job_id=current, queue=queue)
    previous = [job for job in ledger.manifest.ray_jobs if queue.in_queue(job)]
    if previous:
        console.print(f"cancelling the run's earlier Ray job(s) {' '.join(previous)}", markup=False)
        cancel_and_wait_gone(queue, previous)
    started = time.perf_counter()
    job_id = submitter.submit(ray_node_main, spec)
    ledger.manifest.add_slurm_job_id(job_id, ray=True)  # recorded before waiting: teardown finds it
    ledger.manifest.record_stage(BRING_UP, cache_key=job_id, status="submitted", result={"job_id": job_id})
    console.print(f"Ray job {job_id} submitted: {recipe.cluster.num_nodes} node(s) on partition "
                  f"{recipe.cluster.partition}", markup=False)
    ready = wait_ready(files, job_id, queue=queue, submitter=submitter, ray=recipe.cluster.ray)
    check_versions(ready.record)
    seconds = time.perf_counter() - started
    resources = ready.record.get("resources", {})
    ledger.manifest.record_stage(BRING_UP, cache_key=job_id, result={
        "job_id": job_id, "address": ready.address, "bring_up_s": round(seconds, 1)})
    ledger.manifest.update(ray_address=ready.address)
    console.print(f"Ray job {job_id} ready in {seconds:.1f} s: {len(ready.record['nodes'])} nodes "
                  f"({' '.join(ready.record['nodes'])}), {resources.get('CPU', 0):g} CPUs, "
                  f"{resources.get('GPU', 0):g} GPUs, {ready.address}", markup=False)
    return ClusterInfo(address=ready.address, job_id=job_id, queue=queue)


# ---- the session -----------------------------------------------------------------------------
class LiveObjects:
    """The live objects of the runs this process drives — the one process-wide registry.

    - The Ray connection (`ray.init` is per process), and the address it is connected to.
    - Rollout loops by session handle: a task called again in the same process (the next rollout,
      a retry) reuses the ledger, MLflow client and actor handle; a task in another process
      rebuilds them from the run directory and MLflow.

    (The leases of the Ray heads this process brings up are kept by `ray_local.keep_lease`, which
    the early head start uses before this module is imported.)
    """

    def __init__(self) -> None:
        self._loops: dict[SessionHandle, RolloutLoop] = {}
        self._ray_address: str | None = None
        self._token: Path | None = None
        self._lock = threading.Lock()

    def connect(self, address: str, *, token: Path | None = None, cluster_id: str | None = None) -> None:
        """Connect this process to the Ray cluster at `address` as a driver (a `ray://` address: as a
        Ray Client, with the run's token file when given); a process connected to another address
        (an earlier head or Ray job of the run) disconnects first."""
        import ray  # noqa: PLC0415 - Ray only in the processes that talk to the cluster
        from ray._private import ray_constants  # noqa: PLC0415

        with self._lock:
            # A new Ray job of the run listens at the same pinned address: the job id tells them apart.
            identity = f"{address}#{cluster_id or ''}"
            if ray.is_initialized() and self._ray_address == identity:
                return
            _disconnect_all()
            self._token = token
            if address.startswith("ray://"):
                use_token(self._token)
                # Ray Client retries a dropped connection this long before it raises (Ray's default 30 s);
                # Slurm is asked anyway, and a retried task reconnects.
                os.environ.setdefault("RAY_CLIENT_RECONNECT_GRACE_PERIOD", str(CLIENT_RECONNECT_GRACE_S))
            elif address.startswith("127.0.0.1:"):
                # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; when it is on (the Linux
                # default) a driver swaps 127.0.0.1 for the machine's address and never reaches a
                # loopback-only head.
                os.environ.update({k: v for k, v in ray_env().items() if k.startswith("RAY_")})
                ray_constants.ENABLE_RAY_CLUSTER = False
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.ERROR)
            self._ray_address = identity

    def disconnect(self) -> None:
        with self._lock:
            _disconnect_all()
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


def _disconnect_all() -> None:
    """End this process's Ray connection, also a Ray Client one whose server is gone (Ray then reports
    `is_initialized() == False` but keeps the dead client registered, and the next `ray.init`
    refuses to connect)."""
    import ray  # noqa: PLC0415 - see LiveObjects.connect
    from ray.util.client import ray as client  # noqa: PLC0415

    with contextlib.suppress(Exception):
        if ray.is_initialized():
            ray.shutdown()
    with contextlib.suppress(Exception):
        client.disconnect()  # type: ignore[no-untyped-call]


LIVE = LiveObjects()


def open_session(ctx: RunContext, cluster: ClusterInfo, data: dict[str, Any], model: dict[str, Any]) -> SessionHandle:
    """Open (or re-attach to) the engine actor and the MLflow run; return where the session starts."""
    started = time.perf_counter()
    ledger = RunLedger(ctx)
    LIVE.connect(cluster.address, token=_token_of(ledger), cluster_id=cluster.job_id)
    first = ledger.start_rollout_id()
    attempt = ledger.manifest.begin_attempt(
        reason="start" if first == 0 and not ledger.manifest.resume_history else "resume", start_rollout_id=first)
    # A self-logging engine (miles) is built with the MLflow run it logs into: open the run first.
    # The local engine loads its checkpoint while the run opens.
    tracker = ledger.open_tracking(attempt=attempt) if ledger.engine_logs_own_metrics else None
    actor, reattached = attach_actor(namespace=NAMESPACE, ctx=ctx.absolute(ledger.recipe), inputs=ledger.engine_inputs(data, model),
                                     options=ActorOptions.for_recipe(ledger.recipe), num_threads=engine_threads())
    starting = actor.start.remote()
    if tracker is None:
        tracker = ledger.open_tracking(attempt=attempt)
    watch = JobWatch(cluster.queue, cluster.job_id) if cluster.queue is not None and cluster.job_id else None
    start: int = ActorSession.get(starting, "open_session", watch=watch)
    ledger.manifest.set_start_rollout(start)
    handle = SessionHandle(run=ctx, address=cluster.address, start=start, pending_evals=(),
                           mlflow_run_id=tracker.run_id, reattached=reattached, ray_job_id=cluster.job_id,
                           queue=cluster.queue)
    loop = ledger.rollout_loop(ActorSession(actor, handle.watch()), start=start)
    handle = dataclasses.replace(handle, pending_evals=loop.pending_evals)
    if cluster.job_id is not None:
        _record_placement(ledger, actor, cluster, tracker)
    LIVE.put(handle, loop)
    console.print(f"engine session {'re-attached' if reattached else 'opened'} at rollout {start} "
                  f"in {time.perf_counter() - started:.1f} s", markup=False)
    return handle


def _token_of(ledger: RunLedger) -> Path | None:
    token = RayFiles.of(ledger.paths.run_dir).token
    return token if ledger.recipe.cluster.executor == "slurm" and token.exists() else None


def _record_placement(ledger: RunLedger, actor: Any, cluster: ClusterInfo, tracker: Any) -> None:
    """Where the engine actor runs (host, Slurm job and node), into the attempt record and MLflow."""
    where: dict[str, str] = ActorSession.get(actor.placement.remote(), "placement")
    ledger.manifest.record_placement(where)
    bring_up = ledger.manifest.stages.get(BRING_UP)
    seconds = (bring_up.result or {}).get("bring_up_s") if bring_up is not None else None
    tracker.set_tags({"ray_job_id": cluster.job_id or "", "engine_host": where.get("host", ""),
                      "engine_slurm_node": where.get("slurm_node", "")})
    if seconds is not None:
        tracker.log_metrics({"perf/cluster_bring_up_s": float(seconds)}, step=ledger.start_rollout_id())
    console.print(f"engine actor on {where.get('slurm_node') or where.get('host')} (Slurm job "
                  f"{where.get('slurm_job_id')})", markup=False)


def _rebuild(handle: SessionHandle) -> RolloutLoop:
    ledger = RunLedger(handle.run)
    LIVE.connect(handle.address, token=_token_of(ledger), cluster_id=handle.ray_job_id)
    loop = ledger.rollout_loop(ActorSession(lookup_actor(ledger.paths.run_name, namespace=NAMESPACE),
                                            handle.watch()), start=handle.start)
    loop.pending_evals = handle.pending_evals
    return loop


def rollout_steps(handle: SessionHandle) -> Iterator[Step]:
    """The steps of the session's rollout loop, decided one at a time. A deadline mark of the session's
    Ray job (its time limit is near) is a stop request: save at the next boundary, then end the steps
    (`rolled_over` then says so)."""
    loop = LIVE.get(handle)
    files = RayFiles.of(RunLedger(handle.run).paths.run_dir)
    for step in loop.steps():
        yield step
        if handle.ray_job_id is not None and not loop.stop.requested and files.deadline(handle.ray_job_id).exists():
            console.print(f"Ray job {handle.ray_job_id} is near its time limit: saving at the next rollout, "
                          "then moving to a new Ray job", markup=False)
            loop.stop.request("deadline")


def rolled_over(handle: SessionHandle) -> bool:
    """True when the session stopped early for its Ray job's deadline (bring a new job up and go on)."""
    loop = LIVE.get(handle)
    return loop.stop.reason == "deadline" and not loop.outcome().finished


def train_rollout(handle: SessionHandle, rollout_id: int) -> RolloutResult:
    """Run one rollout in the engine session (saving when the loop says so); log it once."""
    return _on_session(handle, lambda loop: loop.train(rollout_id))


def evaluate(handle: SessionHandle, rollout_id: int) -> EvalResult:
    """Evaluate the current policy; log the eval metrics once and the sample table."""
    return _on_session(handle, lambda loop: loop.evaluate(rollout_id))


_R = TypeVar("_R")


def _on_session(handle: SessionHandle, call: Callable[[RolloutLoop], _R]) -> _R:
    """`call` on the session's loop; a lost connection (the cluster still runs: transient) drops this
    process's connection and loop, so the retried task reconnects and gets the session's result."""
    try:
        return call(LIVE.get(handle))
    except ConnectionError:
        LIVE.drop(handle.run)
        LIVE.disconnect()
        raise


# ---- the end ---------------------------------------------------------------------------------
def finish(handle: SessionHandle) -> RunSummary:
    """Close the engine, stop its actor and the run's local Ray head (by pid), then end the MLflow run.

    The MLflow status is set last: miles' processes attach to the run and an exit hook of theirs
    may end it (FINISHED) as they go, so our terminal status must come after they are gone."""
    ledger = RunLedger(handle.run)
    latest = ledger.start_rollout_id() - 1
    complete = latest == ledger.recipe.rollout.num_rollout - 1
    ledger.tracker.log_curves_png()
    _release(ledger, handle, handle.queue, clean=True)
    ledger.tracker.close("FINISHED" if complete else "KILLED")
    ledger.manifest.update(finished=complete)
    return RunSummary(run_name=ledger.paths.run_name, latest_checkpoint=latest, complete=complete,
                      mlflow_run_id=ledger.manifest.mlflow_run_id, tracking_uri=ledger.manifest.mlflow_tracking_uri)


def abort(ctx: RunContext, handle: SessionHandle | None, status: str = "FAILED", *,
          queue: JobQueue | None = None) -> None:
    """After a failure that stops the flow: release the engine and the local cluster, so that no Ray
    head or engine process outlives the run, then end the MLflow run with `status` if this attempt
    had reopened it (decided before the engine's processes end: see `finish`). Checkpoints and the
    manifest stay: the same command resumes once the cause is fixed."""
    ledger = RunLedger(ctx)
    reopened = ledger.tracking_running()
    _release(ledger, handle, queue or (handle.queue if handle is not None else None), clean=False)
    if reopened:
        ledger.tracker.close(status)


def _release(ledger: RunLedger, handle: SessionHandle | None, queue: JobQueue | None, *, clean: bool) -> None:
    """Close the engine (miles disposes its SGLang engines), stop its actor and the run's local Ray
    head (by pid); record the head as stopped. After a `clean` end the head's temp dir (Ray's logs)
    is removed too; after a failure it stays, and is named on the console."""
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
    release_recorded_head(ledger.manifest, keep_logs=not clean)
    release_ray_jobs(ledger, queue, "run finished" if clean else "run stopped")


def release_ray_jobs(ledger: RunLedger, queue: JobQueue | None, why: str = "run finished") -> None:
    """`scancel` every Ray job of the run still in the queue and wait until they have left it."""
    if not ledger.manifest.ray_jobs or queue is None:
        return
    live = [job for job in ledger.manifest.ray_jobs if queue.in_queue(job)]
    cancel_and_wait_gone(queue, live)
    for job in live:
        console.print(f"Ray job {job} cancelled ({why})", markup=False)
    ledger.manifest.update(ray_address=None)
