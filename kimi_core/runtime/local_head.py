"""The run's loopback Ray head (local executor): started and recorded in the run manifest, stopped
by pid; and its early start, which `kimi-grpo run` makes before Prefect is even imported.

A head takes about 5 CPU-seconds and most of its start-up is Ray's own processes booting, so the
sooner it starts the less the run waits for it. The flow starts one beside its stages; when the CLI
runs the flow in its own process, it calls `start_early` right after the recipe checks, and the
flow's bring-up adopts that head (`adopt_early`) instead of starting another (docs/design.md §6).

Light on purpose: the CLI imports this before Prefect, MLflow, torch or Ray.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from kimi_core.engines import engine_name
from kimi_core.recipe import Recipe, recipe_hash
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.manifest import Manifest
from kimi_core.runtime.progress import console
from kimi_core.runtime.ray_local import (
    RayHead,
    free_port,
    keep_lease,
    remove_temp_dir,
    short_temp_dir,
    start_local_ray_head,
    stop_local_ray_head,
    worker_port_range,
)

#: The manifest stage that records the run's Ray cluster (this head, or the run's Ray job on Slurm).
BRING_UP = "bring_up_cluster"
#: Seconds after its owner stops touching the lease that a loopback head ends itself.
LOCAL_LEASE_S = 30.0
#: The loopback head's CPUs: its one actor (the engine session) asks for 1, and the raylet starts
#: as many idle workers as CPUs ahead of time, so a second CPU was a second worker booting beside
#: the run's start-up for nothing.
LOCAL_NUM_CPUS = 1
#: Starts of a loopback head (each with newly picked ports) before bring-up gives up.
LOCAL_START_ATTEMPTS = 3


def preload_modules(recipe: Recipe) -> tuple[str, ...]:
    """What the run's head has its workers import ahead of time: for the local engine, the engine
    session and the engine (torch with them), so that the engine actor lands on the head's idle
    worker with its imports done while the stages ran. None for miles, whose actor has a runtime
    env of its own (a worker of its own) and imports what miles needs."""
    if engine_name(recipe) != "local":
        return ()
    return ("kimi_core.runtime.session", "kimi_core.engines.local")


def start_head(manifest: Manifest, run_dir: Path, recipe: Recipe) -> RayHead:
    """A Ray head on loopback for the run. A head recorded by an earlier process of this run (a killed
    CLI, a crashed flow) is stopped first: one head per run, owned by the process that runs it.
    Its workers preload what `recipe`'s engine needs (`preload_modules`)."""
    release_recorded_head(manifest)
    started = time.perf_counter()
    low, high = worker_port_range()

    def record(head: RayHead) -> None:  # before the head is ready: a rerun finds it and stops it
        manifest.record_stage(BRING_UP, cache_key=head.address, status="starting",
                              result={"address": head.address, "head": dataclasses.asdict(head)})

    # The head ends itself once this process stops touching its lease (a SIGKILLed CLI or flow).
    lease = keep_lease(run_dir / "ray" / "lease", lease_timeout_s=LOCAL_LEASE_S)
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            head = start_local_ray_head(temp_dir=short_temp_dir(), port=free_port(), num_cpus=LOCAL_NUM_CPUS,
                                        object_store_memory=256 * 1024**2, min_worker_port=low,
                                        max_worker_port=high, lease_path=lease, lease_timeout_s=LOCAL_LEASE_S,
                                        on_spawn=record, preload_modules=preload_modules(recipe))
            break
        except (ValueError, RuntimeError) as exc:
            # The head's ports are free when picked, but another process may take one before Ray binds
            # it (a busy host); the failed head is already stopped: pick new ports and try again.
            if attempt == LOCAL_START_ATTEMPTS:
                raise
            console.print(f"ray head did not start ({exc}); retrying with other ports", markup=False)
            low, high = worker_port_range()
    manifest.record_stage(BRING_UP, cache_key=head.address,
                          result={"address": head.address, "head": dataclasses.asdict(head)})
    manifest.update(ray_address=head.address)
    console.print(f"ray head at {head.address}: started in {time.perf_counter() - started:.1f} s", markup=False)
    return head


def release_recorded_head(manifest: Manifest, *, keep_logs: bool = True) -> None:
    """Stop the run's recorded local Ray head (by pid), if any of it is still running.

    Its temp dir (`short_temp_dir`) holds Ray's logs, among them the engine actor's output (drivers do not
    receive it): after a clean end (`keep_logs=False`) it is removed, else kept and named on the
    console, for whoever looks into why the run stopped."""
    record = manifest.stages.get(BRING_UP)
    if record is None or not record.result or "head" not in record.result:
        return
    head = RayHead(**record.result["head"])
    stop_local_ray_head(head)
    if not keep_logs:
        remove_temp_dir(head)
    elif os.path.isdir(head.temp_dir):
        console.print(f"the stopped Ray head's logs: {head.temp_dir}", markup=False)
    manifest.update(ray_address=None)
    manifest.record_stage(BRING_UP, cache_key="stopped", result=None, status="stopped")


# ---- the early start -------------------------------------------------------------------------
_EARLY: dict[Path, tuple[Manifest, Future[RayHead]]] = {}
_EARLY_LOCK = threading.Lock()


def start_early(ctx: RunContext) -> bool:
    """Start the run's head on a background thread, for the flow of this process to adopt.

    Only for a local executor and a run with rollouts left; call it after the recipe checks
    (`preflight`), which refuse a run dir started with another recipe. Returns whether it started.
    Whoever calls it calls `stop_unadopted` when the flow has returned or failed.
    """
    recipe = ctx.recipe()
    if recipe.cluster.executor == "slurm":
        return False
    paths = ctx.paths(recipe)
    try:
        manifest = Manifest.load_or_create(paths, recipe_hash=recipe_hash(recipe))
        if manifest.finished:
            return False  # the flow will find the run complete and start nothing
    except (OSError, ValueError) as exc:  # the flow meets the same problem and reports it as a stage's
        console.print(f"the Ray head is not started early ({exc})", markup=False)
        return False
    future: Future[RayHead] = Future()

    def run() -> None:
        try:
            future.set_result(start_head(manifest, paths.run_dir, recipe))
        except BaseException as exc:  # handed to whoever adopts or stops it
            future.set_exception(exc)

    with _EARLY_LOCK:
        _EARLY[paths.run_dir.resolve()] = (manifest, future)
    threading.Thread(target=run, name="early ray head", daemon=True).start()
    return True


def adopt_early(run_dir: Path) -> RayHead | None:
    """The head `start_early` started for `run_dir`, once ready (it is recorded in the manifest);
    None when there is none, or when it failed (said on the console: the caller starts another)."""
    with _EARLY_LOCK:
        early = _EARLY.pop(run_dir.resolve(), None)
    if early is None:
        return None
    try:
        return early[1].result()
    except Exception as exc:
        console.print(f"the early Ray head did not start ({type(exc).__name__}: {exc}); starting another",
                      markup=False)
        return None


def stop_unadopted(*, timeout_s: float = 120.0) -> list[RayHead]:
    """Stop the early heads no flow adopted (the run was complete, or failed before its bring-up):
    wait (bounded) until each has started or failed, then stop it. Returns the heads it stopped."""
    with _EARLY_LOCK:
        pending = list(_EARLY.items())
        _EARLY.clear()
    stopped = []
    for run_dir, (manifest, future) in pending:
        try:
            head = future.result(timeout=timeout_s)
        except Exception:
            continue  # a failed start stopped its own head; one still starting ends with its lease
        stop_local_ray_head(head)
        remove_temp_dir(head)  # it ran nothing
        release_recorded_head(manifest)  # records it as stopped (the flow's clean-up may have already)
        console.print(f"ray head at {head.address} stopped (not used by a flow in {run_dir})", markup=False)
        stopped.append(head)
    return stopped
