"""The engine session: the engine held in one long-lived process (a detached, named Ray actor).

`EngineSession` makes every per-rollout call idempotent, so a retried task re-attaches and never
trains a rollout twice. `attach_session` creates the actor or re-attaches to it by name.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from kimi_core.engines import make_engine
from kimi_core.engines.base import EngineInputs
from kimi_core.pipeline.context import RunContext
from kimi_core.ray_local import ray_env
from kimi_core.recipe import plan_run
from kimi_core.run_state import cleanup_incomplete, latest_checkpoint


#: File in each checkpoint directory: metrics of the rollouts since the previous checkpoint.
ROLLOUT_METRICS_FILE = "rollout_metrics.json"
#: Environment variable: torch threads of the engine (default `DEFAULT_THREADS`), for the flow and the fallback.
THREADS_ENV = "KIMI_GRPO_THREADS"
DEFAULT_THREADS = 1  # the engine actor ran no faster with 2 on a 2-core machine (orchestration benchmark)


def engine_threads() -> int:
    """Torch threads for the engine: `$KIMI_GRPO_THREADS`, else `DEFAULT_THREADS`."""
    value = os.environ.get(THREADS_ENV, str(DEFAULT_THREADS))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"${THREADS_ENV}={value!r}: expected a positive integer (torch threads of the engine)")
    return int(value)


class SessionOutOfStep(RuntimeError):
    """The caller asked for a rollout the session is not at (the session must be reopened)."""


class EngineSession:
    """Runs one rollout per call: train -> save if due (or if a deadline save was requested)."""

    def __init__(self, ctx: RunContext, inputs: EngineInputs, *, num_threads: int | None = None):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.ctx = ctx
        self.recipe = ctx.recipe()
        self.paths = ctx.paths(self.recipe)
        self.plan = plan_run(self.recipe)
        self.engine = make_engine(self.recipe, paths=self.paths, inputs=inputs)
        self.next_rollout = -1
        self.done: dict[int, dict[str, Any]] = {}
        self.unsaved: dict[int, dict[str, float]] = {}  # metrics of rollouts since the last save
        self.save_requested = False
        self._lock = threading.Lock()  # a retried call waits for the running one, then finds its result

    def start(self) -> int:
        """(Re)load the latest complete checkpoint; return the first rollout id to run."""
        with self._lock:
            self.done.clear()
            self.unsaved.clear()
            # This session is the run's only checkpoint writer: temp dirs left here are saves an
            # earlier process did not finish (never the latest: the tracker moves last).
            for partial in cleanup_incomplete(self.paths):
                print(f"removed the unfinished save {partial}", flush=True)
            self.next_rollout = self.engine.start(latest_checkpoint(self.paths))
            return self.next_rollout

    def status(self) -> dict[str, Any]:
        return {"next_rollout": self.next_rollout, "pid": os.getpid(), "latest": latest_checkpoint(self.paths)}

    def request_save(self) -> None:
        """Save at the next rollout boundary whatever the schedule (deadline / preemption)."""
        self.save_requested = True

    def train_rollout(self, rollout_id: int) -> dict[str, Any]:
        with self._lock:
            return self._train_rollout(rollout_id)

    def _train_rollout(self, rollout_id: int) -> dict[str, Any]:
        if rollout_id in self.done:
            return self.done[rollout_id]
        if rollout_id != self.next_rollout:
            raise SessionOutOfStep(f"session is at rollout {self.next_rollout}, asked for {rollout_id}")
        metrics = self.engine.train_rollout(rollout_id)
        result: dict[str, Any] = {"metrics": metrics, "checkpoint": None}
        self.unsaved[rollout_id] = metrics
        if self.plan.is_save_due(rollout_id) or self.save_requested:
            # the metrics travel with the checkpoint: a rollout saved after its orchestrator died is
            # still logged when the run resumes (it is not redone)
            extra = {ROLLOUT_METRICS_FILE: json.dumps({str(k): v for k, v in self.unsaved.items()}).encode()}
            result["checkpoint"] = self.engine.save(rollout_id, extra_files=extra)
            self.unsaved.clear()
            self.save_requested = False
        self.done = {rollout_id: result}
        self.next_rollout = rollout_id + 1
        return result

    def evaluate(self, rollout_id: int) -> dict[str, Any]:
        with self._lock:
            metrics = self.engine.evaluate(rollout_id)
        return {"metrics": metrics, "samples": self.engine.eval_samples}

    def close(self) -> None:
        self.engine.close()


def actor_name(run_name: str) -> str:
    return f"kimi-grpo-engine-{run_name}"


def attach_session(
    *,
    address: str,
    namespace: str,
    ctx: RunContext,
    inputs: EngineInputs,
    num_cpus: float = 1,
    num_threads: int | None = None,
) -> tuple[Any, bool]:
    """Connect to Ray and create or re-attach to the run's detached engine actor.

    Returns at once with `(actor handle, reattached)`: a new actor builds its engine in the
    background; call `start` on it to (re)load the latest checkpoint.
    """
    import ray

    _connect(address, namespace)
    name = actor_name(ctx.name(ctx.recipe()))
    try:
        return ray.get_actor(name, namespace=namespace), True
    except ValueError:
        remote_cls = ray.remote(EngineSession)
        actor = remote_cls.options(name=name, namespace=namespace, lifetime="detached", num_cpus=num_cpus, max_concurrency=2,
                                   max_restarts=0).remote(ctx, inputs, num_threads=num_threads)
        return actor, False


def get_session(name: str, *, address: str, namespace: str) -> Any:
    """The live actor of run `name` (raises `ValueError` when it does not exist)."""
    import ray

    _connect(address, namespace)
    return ray.get_actor(actor_name(name), namespace=namespace)


def _connect(address: str, namespace: str) -> None:
    """Connect this process to the run's Ray cluster once (loopback-only settings of `ray_env`)."""
    import ray

    if ray.is_initialized():
        return
    if address.startswith("127.0.0.1:"):
        # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; when it is on (Linux default)
        # a driver swaps 127.0.0.1 for the machine's address and never reaches a loopback-only head.
        from ray._private import ray_constants

        os.environ.update({k: v for k, v in ray_env().items() if k.startswith("RAY_")})
        ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="ERROR")
