"""`MilesEngine`: miles' train.py @31f1ca961, one rollout per call (docs/design.md §5).

`start` is train.py's setup, `train_rollout` its loop body in the same memory-phase order,
`evaluate` the rollout manager's eval, `close` its dispose. The flow's `RolloutLoop` (docs §4.1)
decides what train.py's loop decides by itself: when to save, when to evaluate, when to stop.
Everything miles is reached through `MilesApi` (`api.py`), loaded when `start` runs.

States: NEW -> (start) -> READY -> (call) BUSY -> READY; BROKEN after a failure the engine cannot
undo; CLOSED after `close`. A failure in `generate` or `eval` (miles has not touched the weights)
leaves READY, so the same call may be retried in this engine. Any other failure, a child actor's
death (`MilesApi.is_actor_death`) or a phase that overruns its timeout (`PhaseTimeouts`) makes the
engine BROKEN: that call and every later one raise `EngineBroken`, which the runtime treats as a
lost session (a new process resumes from the latest checkpoint). miles keeps process-global
singletons (the object store, the logger, tracking), so it is brought up once per process: a
second `start` raises.

Metrics: miles logs its own (`rollout/*`, `train/*`, `perf/*`, `eval/*`) into the run's MLflow run
(`--use-mlflow --mlflow-run-id`, see `args.py`); its calls return none. `RolloutResult.metrics`
holds only this driver's own phase timings (`perf/driver/*`) and `EvalResult.metrics` is empty;
both carry `logged_by_engine=True` when miles logs to a run (`EngineInputs.tracking`), and the
runtime reads miles' metrics of that step back from MLflow (`kimi_core.runtime.recording`).

Deviations from train.py @31f1ca961 (the contract test `tests/engines/test_miles_engine.py`
applies exactly these to its hand-written trace of train.py):

1. No `init_tracking` / `finish_tracking`: the flow owns the MLflow run; miles' secondary loggers
   (RolloutManager, the train main rank) attach to it by `--mlflow-run-id`. No periodic py-spy,
   control server, mini FT controller or weight check (their flags are refused by `args.py`).
2. Saves, evals and the stop come from the loop: a requested save (`StopRequest`) is train.py's
   sentinel save (`--save-trigger-sentinel`: `force_sync=True`) followed by a stop at the next
   boundary (as `--debug-exit-after-rollout`); then `close` disposes as train.py does after its loop.
3. Without `checkpoint.save_interval`, train.py never saves; the loop saves after the final rollout
   (docs §4 schedule). With it, both save at `(i + 1) % interval == 0` and at the final rollout.
   (`num_rollout_per_epoch` is None whenever `--num-rollout` is given, which it always is here, so
   train.py's epoch-boundary saves and evals never happen.)
4. On a resume the loop replays an eval that was due at `start - 1` but never logged (docs §4.1);
   train.py does not. The eval before training follows the recipe (`eval.before_train`), and
   `--skip-eval-before-train` tells miles the same.
5. Before parsing, `reconcile_checkpoints` repairs the checkpoint dir (untracked iterations moved
   aside, a tracker without its data position rewound), and after bring-up the engine checks that
   miles' `args.start_rollout_id` is the reconciled latest + 1 (`StartMismatch` otherwise).
6. A retried `generate` starts from the data position miles' data source reached during the failed
   attempt (miles advances it as it draws prompts), so its prompts may differ from an uninterrupted
   run's; weights, optimizer and the saved data position are untouched.
7. After a save the engine checks the commit (tracker = i, `iter_i`, data position) and writes
   `rollout_metrics.json` (its own timings of the rollouts since the previous save) into `iter_i`.
8. The critic (PPO) path is not mirrored (`--advantage-estimator ppo` is refused).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import inspect
import json
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from kimi_core.atomic import write_text_atomic
from kimi_core.engines.base import ROLLOUT_METRICS_FILE, EngineBroken, EngineInputs, EvalResult, RolloutResult
from kimi_core.engines.miles.api import MilesApi, load_miles_api
from kimi_core.engines.miles.args import miles_argv
from kimi_core.engines.miles.checkpoints import reconcile_checkpoints
from kimi_core.recipe.plan import resolve_path
from kimi_core.recipe.sections import Recipe
from kimi_core.run_state import CheckpointError, RunPaths, checkpoint_dir, dataset_state_path


class State(enum.Enum):
    NEW = "new"
    READY = "ready"
    BUSY = "busy"
    BROKEN = "broken"
    CLOSED = "closed"


class PhaseTimeout(TimeoutError):
    """A miles call ran past its `PhaseTimeouts` limit (miles has no timeout of its own on generate)."""


class StartMismatch(RuntimeError):
    """miles derived another first rollout than the checkpoint dir says: permanent (not retried)."""


@dataclass(frozen=True)
class PhaseTimeouts:
    """Seconds each miles call may take before the engine gives up on it and becomes BROKEN."""

    bring_up: float = 4 * 3600.0  # each of: placement groups, rollout manager, training models, first push
    generate: float = 4 * 3600.0
    train: float = 4 * 3600.0
    save: float = 2 * 3600.0
    memory: float = 1800.0  # offload / onload / clear memory
    update_weights: float = 3600.0
    evaluate: float = 4 * 3600.0
    dispose: float = 600.0


#: MilesApi objects brought up in this process (miles' singletons are per process).
_BROUGHT_UP: list[MilesApi] = []
_BRING_UP_LOCK = threading.Lock()
#: miles' parse_args reads `sys.argv` (miles/utils/arguments.py @31f1ca961): patched under this lock.
_ARGV_LOCK = threading.Lock()


def _in_thread(name: str, work: Callable[[], Any]) -> concurrent.futures.Future[Any]:
    """Run blocking `work` in a daemon thread (a hung miles call must not block interpreter exit)."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(work())
        except BaseException as exc:  # handed to the waiting caller
            future.set_exception(exc)

    threading.Thread(target=run, name=f"miles-{name}", daemon=True).start()
    return future


class MilesEngine:
    """The `Engine` protocol over miles (module docstring). Not thread-safe: the session serialises calls."""

    def __init__(self, recipe: Recipe, *, paths: RunPaths, inputs: EngineInputs,
                 timeouts: PhaseTimeouts = PhaseTimeouts(), extra_args: Sequence[str] = ()):
        self.recipe = recipe
        self.paths = paths
        self.inputs = inputs
        self.timeouts = timeouts
        self.extra_args = tuple(extra_args)
        self.state = State.NEW
        self.api: MilesApi | None = None
        self.args: Any = None
        self._rm: Any = None
        self._actor: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._unsaved_metrics: dict[str, dict[str, float]] = {}
        self.broken_reason: str | None = None

    # ---- plumbing ----------------------------------------------------------------------------
    def _miles(self) -> MilesApi:
        assert self.api is not None, "start() loads the miles API"
        return self.api

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        """miles' train groups are coroutines (miles/ray/actor_group.py @31f1ca961): one private loop runs them."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="miles-engine-loop", daemon=True)
            thread.start()
            self._loop, self._loop_thread = loop, thread
        return self._loop

    def _wait(self, phase: str, work: Callable[[], Any] | Coroutine[Any, Any, Any], timeout: float) -> Any:
        """Run one miles call (a coroutine on the private loop, or a blocking call in a thread) and
        wait at most `timeout` seconds; an overrun cancels what can be cancelled and raises `PhaseTimeout`."""
        if inspect.iscoroutine(work):
            future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(work, self._ensure_loop())
        else:
            assert callable(work)
            future = _in_thread(phase, work)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.done() and not future.cancelled():
                raise  # the call itself raised a TimeoutError
            future.cancel()
            raise PhaseTimeout(f"miles {phase} ran past its {timeout:g} s limit") from None

    def _remote(self, phase: str, method: str, *args: Any, timeout: float, **kwargs: Any) -> Any:
        """`get(rollout_manager.<method>.remote(...))`: train.py awaits these ObjectRefs."""
        api, rm = self._miles(), self._rm
        return self._wait(phase, lambda: api.get(getattr(rm, method).remote(*args, **kwargs)), timeout)

    def _fatal(self, exc: BaseException) -> bool:
        return isinstance(exc, PhaseTimeout) or (self.api is not None and self.api.is_actor_death(exc))

    def _broken(self, what: str, exc: BaseException) -> EngineBroken:
        self.state = State.BROKEN
        self.broken_reason = f"{what}: {type(exc).__name__}: {exc}"
        return EngineBroken(f"the miles engine is broken ({self.broken_reason}); a new session must resume "
                            "from the latest checkpoint")

    def _enter(self, what: str) -> None:
        if self.state is State.READY:
            self.state = State.BUSY
            return
        if self.state is State.BROKEN:
            raise EngineBroken(f"{what}: the miles engine is broken ({self.broken_reason})")
        raise EngineBroken(f"{what}: the miles engine is {self.state.value}, not ready")

    # ---- the protocol -------------------------------------------------------------------------
    def start(self, resume_from: int | None) -> int:
        """train.py's setup @31f1ca961: `parse_args` (argv patched), `configure_logger(args,
        source=MainProcessIdentity())`, `create_placement_groups`, `object_store.init_instance(args,
        contribute_segment=False)`, `create_rollout_manager`, `await create_training_models`, then
        the bring-up (`onload_weights` if offloading rollout, `update_weights()`, `onload_kv`).

        Before the parse the checkpoint dir is reconciled (`checkpoints.reconcile_checkpoints`);
        `resume_from` must be the tracker it found. Returns the first rollout id, checked against
        miles' own `args.start_rollout_id` (`StartMismatch` when they differ)."""
        if self.state is not State.NEW:
            raise EngineBroken(f"start: the miles engine is {self.state.value}; miles is brought up once per process")
        self.state = State.BUSY
        try:
            return self._start(resume_from)
        except (StartMismatch, CheckpointError, ValueError) as exc:
            self.state, self.broken_reason = State.BROKEN, f"start: {type(exc).__name__}: {exc}"
            raise  # permanent: a new session would fail the same way
        except Exception as exc:
            raise self._broken("bring-up", exc) from exc
        finally:
            if self.state is State.BUSY:
                self.state = State.BROKEN
                self.broken_reason = self.broken_reason or "start was interrupted"

    def _start(self, resume_from: int | None) -> int:
        repair = reconcile_checkpoints(self.paths)
        if resume_from != repair.tracked:
            raise CheckpointError(f"asked to resume from {resume_from}, but the tracker {self.paths.tracker} names "
                                  f"{repair.tracked}")
        start = repair.start
        argv = self.argv(start)
        api = load_miles_api()
        with _BRING_UP_LOCK:
            if any(api is other for other in _BROUGHT_UP):
                raise EngineBroken("miles was already brought up in this process (process-global singletons); "
                                   "a new session process is needed")
            _BROUGHT_UP.append(api)
        self.api = api
        t = self.timeouts
        with _ARGV_LOCK:
            saved, sys.argv = sys.argv, ["train.py", *argv]
            try:
                args = api.parse_args()
            except SystemExit as exc:  # argparse exits on a bad flag; the session process must not
                raise ValueError(f"miles rejected its arguments (exit {exc.code}); see the log above") from None
            finally:
                sys.argv = saved
        self.args = args
        if getattr(args, "use_critic", False):
            raise ValueError("miles parsed a critic (PPO) run; the engine mirrors train.py's actor-only path")
        api.configure_logger(args, source=api.MainProcessIdentity())
        pgs = self._wait("create_placement_groups", lambda: api.create_placement_groups(args), t.bring_up)
        api.object_store_init(args, contribute_segment=False)
        self._rm, _per_epoch = self._wait("create_rollout_manager",
                                          lambda: api.create_rollout_manager(args, pgs["rollout"]), t.bring_up)
        self._actor, _critic = self._wait("create_training_models",
                                          api.create_training_models(args, pgs, self._rm), t.bring_up)
        if args.start_rollout_id != start:
            raise StartMismatch(f"miles starts at rollout {args.start_rollout_id}, but the checkpoint dir "
                                f"{self.paths.checkpoints} says {start} (latest {repair.latest})")
        if args.offload_rollout:
            self._remote("onload_weights", "onload_weights", timeout=t.memory)
        # "always update weight first so that sglang has the loaded weights from training" (train.py)
        self._wait("update_weights", self._actor.update_weights(), t.update_weights)
        if args.offload_rollout:
            self._remote("onload_kv", "onload_kv", timeout=t.memory)
        self.state = State.READY
        return start

    def argv(self, start: int) -> list[str]:
        """The miles argv of this engine for a session starting at rollout `start` (`args.miles_argv`)."""
        ref = self.inputs.reference_checkpoint
        if ref is None and self.recipe.checkpoint.ref_load:
            ref = resolve_path(self.recipe, self.recipe.checkpoint.ref_load, run_name=self.paths.run_name)
        return miles_argv(self.recipe, paths=self.paths, prompt_data=self.inputs.train_data,
                          eval_data=self.inputs.eval_data, hf_checkpoint=self.inputs.initial_checkpoint,
                          ref_load=ref, tracking=self.inputs.tracking, start=start, extra=self.extra_args)

    def offload_tags(self) -> list[str]:
        """train.py's rollout offload tags: CUDA graphs always, KV cache / weights per `--offload-rollout-level`."""
        api, level = self._miles(), self.args.offload_rollout_level
        tags = [api.GPU_MEMORY_TYPE_CUDA_GRAPH]
        if "kv_cache" in level:
            tags.append(api.GPU_MEMORY_TYPE_KV_CACHE)
        if "weight" in level:
            tags.append(api.GPU_MEMORY_TYPE_WEIGHTS)
        return tags

    def train_rollout(self, rollout_id: int, *, save: bool, force_sync: bool) -> RolloutResult:
        """train.py's loop body @31f1ca961, in its memory-phase order: `generate(i)` -> offload the
        rollout engines -> `train(i, pack)` -> `remove_rollout_data_refs` -> with `save`:
        `save_model(i, force_sync)` then `rollout_manager.save(i)` -> offload the trainer (or clear
        its memory) -> `onload_weights` -> `update_weights(rollout_id=i)` -> `onload_kv`."""
        self._enter(f"train_rollout {rollout_id}")
        api, args, actor, t = self._miles(), self.args, self._actor, self.timeouts
        timings: dict[str, float] = {}
        phase, done = "generate", False
        try:
            began = time.perf_counter()
            pack = self._remote("generate", "generate", rollout_id, timeout=t.generate)
            timings["perf/driver/generate_time"] = time.perf_counter() - began
            phase = "offload rollout"
            if args.offload_rollout:
                self._remote(phase, "offload", tags=self.offload_tags(), timeout=t.memory)
            phase = "train"
            began = time.perf_counter()
            self._wait(phase, actor.train(rollout_id, pack), t.train)
            timings["perf/driver/train_time"] = time.perf_counter() - began
            api.remove_rollout_data_refs(args, pack)
            checkpoint: str | None = None
            if save:
                phase = "save"
                began = time.perf_counter()
                self._wait("save_model", actor.save_model(rollout_id, force_sync=force_sync), t.save)
                self._remote("save", "save", rollout_id, timeout=t.save)
                timings["perf/driver/save_time"] = time.perf_counter() - began
            phase = "offload train"
            if args.offload_train:
                self._wait(phase, actor.offload(), t.memory)
            else:
                self._wait(phase, actor.clear_memory(), t.memory)
            phase = "update weights"
            began = time.perf_counter()
            if args.offload_rollout:
                self._remote("onload_weights", "onload_weights", timeout=t.memory)
            self._wait(phase, actor.update_weights(rollout_id=rollout_id), t.update_weights)
            if args.offload_rollout:
                self._remote("onload_kv", "onload_kv", timeout=t.memory)
            timings["perf/driver/update_weights_time"] = time.perf_counter() - began
            self._unsaved_metrics[str(rollout_id)] = dict(timings)
            if save:
                phase = "commit check"
                checkpoint = self._committed(rollout_id)
            done = True
        except Exception as exc:
            if phase == "generate" and not self._fatal(exc):
                self.state = State.READY  # nothing trained: the same rollout may be retried here
                raise
            raise self._broken(f"train_rollout {rollout_id} ({phase})", exc) from exc
        finally:
            if not done and self.state is State.BUSY:  # interrupted (KeyboardInterrupt): state unknown
                self.state, self.broken_reason = State.BROKEN, f"train_rollout {rollout_id} interrupted in {phase}"
        self.state = State.READY
        return RolloutResult(rollout_id=rollout_id, metrics=timings, checkpoint=checkpoint,
                             logged_by_engine=self.inputs.tracking is not None)

    def _committed(self, rollout_id: int) -> str:
        """Check miles committed the save of `rollout_id`; write `rollout_metrics.json` into it."""
        final = checkpoint_dir(self.paths, rollout_id)
        tracked = self.paths.tracker.read_text(encoding="utf-8").strip() if self.paths.tracker.is_file() else None
        if tracked != str(rollout_id) or not final.is_dir() or not dataset_state_path(self.paths, rollout_id).is_file():
            raise CheckpointError(f"miles saved rollout {rollout_id}, but the tracker says {tracked!r} or {final} or "
                                  f"its data position is missing")
        write_text_atomic(final / ROLLOUT_METRICS_FILE, json.dumps(self._unsaved_metrics, sort_keys=True))
        self._unsaved_metrics = {}
        return str(final)

    def evaluate(self, rollout_id: int) -> EvalResult:
        """`rollout_manager.eval(rollout_id)` (train.py @31f1ca961). miles logs `eval/*` to MLflow
        itself and returns nothing: the result carries no metrics (the runtime reads them back)."""
        self._enter(f"evaluate {rollout_id}")
        try:
            self._remote("eval", "eval", rollout_id, timeout=self.timeouts.evaluate)
        except Exception as exc:
            if not self._fatal(exc):
                self.state = State.READY
                raise
            raise self._broken(f"evaluate {rollout_id}", exc) from exc
        self.state = State.READY
        return EvalResult(rollout_id=rollout_id, metrics={}, samples=(), logged_by_engine=self.inputs.tracking is not None)

    def close(self) -> None:
        """`rollout_manager.dispose()` (train.py's last call), then stop the private loop. A broken
        engine is disposed on a best-effort basis; the process must end to free miles' singletons."""
        if self.state is State.CLOSED:
            return
        healthy = self.state is State.READY
        try:
            if self._rm is not None:
                try:
                    self._remote("dispose", "dispose", timeout=self.timeouts.dispose if healthy else 30.0)
                except Exception:
                    if healthy:
                        raise
        finally:
            self.state = State.CLOSED
            self.broken_reason = self.broken_reason or "closed"
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
                if self._loop_thread is not None:
                    self._loop_thread.join(timeout=5)
