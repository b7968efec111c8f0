"""The engine session: the engine held by one long-lived process (docs/design.md §5).

`EngineSession` owns one engine and makes every per-rollout call idempotent: a retried call for
the rollout it just ran returns the result it holds, so a retried task never trains a rollout
twice. In the flow it lives in a detached, named Ray actor (`attach_actor`), driven through an
`ActorSession`; in the sbatch fallback and the benchmarks, in the calling process.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from kimi_core.engines import engine_name, make_engine
from kimi_core.engines.base import EngineBroken, EngineInputs, EvalResult, RolloutResult
from kimi_core.recipe import Recipe
from kimi_core.run_state import cleanup_incomplete, latest_checkpoint
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.failures import SessionLost
from kimi_core.runtime.progress import console

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


_T = TypeVar("_T")


class _EngineThread:
    """One daemon thread that runs the calls given to `run`, one at a time, in order."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="engine", daemon=True).start()

    def run(self, call: Callable[[], _T]) -> _T:
        """`call()` on the thread; its exception is raised here as itself."""
        future: Future[_T] = Future()
        self._calls.put((future, call))
        return future.result()

    def stop(self) -> None:
        """End the thread after the calls already given."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            future, call = item
            try:
                future.set_result(call())
            except BaseException as exc:  # handed to the caller, whatever it is
                future.set_exception(exc)


class EngineSession:
    """One engine, one rollout at a time; the loop decides what to save (`save`, `force_sync`).

    Every engine call, its construction included, runs on one thread of the session's own, whatever
    thread the call comes in on (a threaded Ray actor runs each call on any of its pool threads).
    glibc gives each thread that allocates its own heap, so calls spread over two threads grew two
    heaps to the engine's working set, and fresh pages are what a new process pays most for on a
    small VM (docs/design.md §5, engine speed)."""

    def __init__(self, ctx: RunContext, inputs: EngineInputs, *, num_threads: int | None = None):
        self._thread = _EngineThread()
        if num_threads:
            import torch  # noqa: PLC0415 - the session process is the one that pays for torch

            torch.set_num_threads(num_threads)
        recipe = ctx.recipe()
        self.paths = ctx.paths(recipe)
        self.engine = self._thread.run(lambda: make_engine(recipe, paths=self.paths, inputs=inputs))
        self.next_rollout = -1
        self.last: RolloutResult | None = None
        self._lock = threading.Lock()  # a retried call waits for the running one, then finds its result

    def start(self) -> int:
        """(Re)load the latest complete checkpoint; return the first rollout id to run."""
        with self._lock:
            self.last = None
            # This session is the run's only checkpoint writer: temp dirs left here are saves an
            # earlier process did not finish (never the latest: the tracker moves last).
            for partial in cleanup_incomplete(self.paths):
                console.print(f"removed the unfinished save {partial}", markup=False)
            try:
                self.next_rollout = self._thread.run(lambda: self.engine.start(latest_checkpoint(self.paths)))
            except EngineBroken as exc:
                raise SessionLost(str(exc)) from exc
            return self.next_rollout

    def train_rollout(self, rollout_id: int, *, save: bool, force_sync: bool) -> RolloutResult:
        with self._lock:
            if self.last is not None and self.last.rollout_id == rollout_id:
                return self.last
            if rollout_id != self.next_rollout:
                raise SessionOutOfStep(f"session is at rollout {self.next_rollout}, asked for {rollout_id}")
            try:
                self.last = self._thread.run(
                    lambda: self.engine.train_rollout(rollout_id, save=save, force_sync=force_sync))
            except EngineBroken as exc:
                raise SessionLost(str(exc)) from exc
            self.next_rollout = rollout_id + 1
            return self.last

    def evaluate(self, rollout_id: int) -> EvalResult:
        with self._lock:
            try:
                return self._thread.run(lambda: self.engine.evaluate(rollout_id))
            except EngineBroken as exc:
                raise SessionLost(str(exc)) from exc

    def close(self) -> None:
        try:
            self._thread.run(self.engine.close)
        finally:
            self._thread.stop()

    def placement(self) -> dict[str, str]:
        """Where this session runs: host, and the Slurm job and node when under Slurm."""
        return {"host": socket.gethostname(), "pid": str(os.getpid()),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "slurm_node": os.environ.get("SLURMD_NODENAME", "")}


# ---- the session in a Ray actor --------------------------------------------------------------
def actor_name(run_name: str) -> str:
    return f"kimi-grpo-engine-{run_name}"


#: Ray's resource on the head node only (Ray 2.60: `ray._common.constants.HEAD_NODE_RESOURCE_NAME`);
#: asking for a sliver of it pins an actor to the head (as Ray Train's state actor does).
HEAD_NODE_RESOURCE = "node:__internal_head__"
#: Makes Ray kill the processes a worker started (SGLang servers) when the worker exits.
KILL_CHILDREN_ENV = "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"


@dataclass(frozen=True)
class ActorOptions:
    """How the engine actor is placed, as data: the local recipe's defaults, or `for_recipe`'s for a
    GPU recipe (miles: no GPU of its own — miles places its GPU actors itself —, on the head node,
    the recipe's `env` and the child-killing switch in its runtime env)."""

    num_cpus: float = 1
    num_gpus: float = 0
    on_head_node: bool = False
    env_vars: tuple[tuple[str, str], ...] = ()

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> ActorOptions:
        if engine_name(recipe) == "local":  # the miles engine: the head node, the recipe env
            # On a Ray job of several nodes the session stays on the head, beside the job's task 0.
            return cls(on_head_node=recipe.cluster.executor == "slurm")
        return cls(on_head_node=True, env_vars=tuple(sorted({**recipe.env, KILL_CHILDREN_ENV: "1"}.items())))

    def ray_options(self) -> dict[str, Any]:
        """Keyword arguments of `.options()` besides the name: always detached, never restarted by Ray
        (a lost session is resumed by the flow from the latest checkpoint)."""
        options: dict[str, Any] = {"lifetime": "detached", "num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                   "max_concurrency": 2, "max_restarts": 0}
        if self.on_head_node:
            options["resources"] = {HEAD_NODE_RESOURCE: 0.001}
        if self.env_vars:
            options["runtime_env"] = {"env_vars": dict(self.env_vars)}
        return options


def attach_actor(*, namespace: str, ctx: RunContext, inputs: EngineInputs, options: ActorOptions = ActorOptions(),
                 num_threads: int | None = None) -> tuple[Any, bool]:
    """Create the run's detached engine actor with `options`, or re-attach to it by name (Ray must be
    connected).

    Returns at once with `(actor handle, reattached)`: a new actor builds its engine in the
    background; call `start` on it to (re)load the latest checkpoint.
    """
    import ray  # noqa: PLC0415 - Ray is imported by the processes that talk to the cluster only

    name = actor_name(ctx.name(ctx.recipe()))
    try:
        return ray.get_actor(name, namespace=namespace), True
    except ValueError:
        remote_cls = ray.remote(EngineSession)
        actor = remote_cls.options(name=name, namespace=namespace, **options.ray_options()).remote(
            ctx, inputs, num_threads=num_threads)
        return actor, False


def lookup_actor(run_name: str, *, namespace: str) -> Any:
    """The live engine actor of run `run_name`; `SessionLost` when it is gone."""
    import ray  # noqa: PLC0415 - see attach_actor

    try:
        return ray.get_actor(actor_name(run_name), namespace=namespace)
    except (ValueError, ConnectionError) as exc:
        raise SessionLost(f"the engine session of run {run_name!r} is gone: {exc}") from exc


#: Seconds between looks at the cluster while a call on the engine actor runs (`ActorSession.watch`).
WATCH_POLL_S = 10.0


class ActorSession:
    """The loop's `Session` over an `EngineSession` actor: a dead actor becomes `SessionLost`, an
    error raised inside a call is re-raised as itself (so the loop and Prefect classify it).

    `watch`, when given, is called between bounded waits on every call and raises `SessionLost`
    when the cluster under the actor is gone (Ray on Slurm: the job is no longer RUNNING), so a
    lost job is noticed even when no Ray error ever reaches this process."""

    def __init__(self, actor: Any, watch: Callable[[], None] | None = None):
        self.actor = actor
        self.watch = watch

    def train_rollout(self, rollout_id: int, *, save: bool, force_sync: bool) -> RolloutResult:
        result: RolloutResult = self.get(self.actor.train_rollout.remote(rollout_id, save=save, force_sync=force_sync),
                                          f"train_rollout {rollout_id}", watch=self.watch)
        return result

    def evaluate(self, rollout_id: int) -> EvalResult:
        result: EvalResult = self.get(self.actor.evaluate.remote(rollout_id), f"evaluate {rollout_id}", watch=self.watch)
        return result

    @staticmethod
    def get(ref: Any, what: str, *, watch: Callable[[], None] | None = None) -> Any:
        """`ray.get(ref)`, with a dead actor as `SessionLost` and a call's own error re-raised as itself;
        with `watch`, waits in bounded polls and calls `watch()` between them."""
        import ray  # noqa: PLC0415 - see attach_actor
        import ray.exceptions as rex  # noqa: PLC0415

        try:
            while watch is not None:
                try:
                    ready, _ = ray.wait([ref], timeout=WATCH_POLL_S)
                except Exception as exc:  # a Ray Client whose server went away raises a bare Exception
                    watch()  # SessionLost when the job under the cluster has ended
                    raise ConnectionError(f"{what}: lost the connection to the Ray cluster: {exc}") from exc
                if ready:
                    break
                watch()
            return ray.get(ref)
        except (rex.RayActorError, rex.ActorDiedError) as exc:
            raise SessionLost(f"{what}: the engine actor died: {exc}") from exc
        except rex.RayTaskError as exc:
            cause = exc.cause if exc.cause is not None else exc
            if isinstance(cause, SessionOutOfStep):
                raise SessionLost(f"{what}: {cause}") from exc
            raise cause from exc
