"""The one rollout loop (docs/design.md §4): the per-rollout story, written once.

    pending evals (eval before training on a fresh run, or one a crash interrupted)
    for each rollout id from the start to `num_rollout`:
        stop here if a stop was requested and nothing trained is unsaved
        train it, saving when the schedule says so or a stop was requested
        log its metrics once; evaluate when due

The Prefect flow runs the steps one task at a time (`RolloutLoop.steps`, then `train` / `evaluate`
per step); the sbatch fallback and the benchmarks call `run`. The loop owns the save decision,
the eval schedule, logging each metric once and the stop request (deadline or preemption: save at
the next rollout boundary, then stop). It never sees tensors: a `Session` does the work, a
`Recorder` keeps the results.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Literal, Protocol, TypeVar

from kimi_core.engines.base import EvalResult, RolloutResult
from kimi_core.recipe import RunPlan
from kimi_core.runtime.failures import PermanentFailure, SessionLost


class Session(Protocol):
    """What the loop drives: an `EngineSession` in this process, or the handle of one in a Ray actor."""

    def train_rollout(self, rollout_id: int, *, save: bool, force_sync: bool) -> RolloutResult: ...

    def evaluate(self, rollout_id: int) -> EvalResult: ...


class Recorder(Protocol):
    """Where results go (MLflow and the progress line, or a list in a benchmark)."""

    def rollout(self, result: RolloutResult, *, step_time: float, log_metrics: bool) -> RolloutResult:
        """Keep `result`; return it as the step returns it (an engine's self-logged metrics read back)."""

    def eval(self, result: EvalResult, *, log_metrics: bool) -> EvalResult:
        """Keep `result`; return it as the step returns it."""


_R = TypeVar("_R", RolloutResult, EvalResult)

#: `(stage, rollout_id, error) -> how many times this same failure is now recorded`.
FailureLog = Callable[[str, int, str], int]


class StopRequest:
    """A request to stop at the next rollout boundary (deadline, preemption, `scontrol requeue`).

    `install(signums)` makes those signals set it; the handler only flips a flag, so it is safe
    whatever the process is doing (stage jobs, conversion, a rollout).
    """

    def __init__(self) -> None:
        self.reason: str | None = None

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def install(self, signums: tuple[signal.Signals, ...], *, announce: Callable[[str], None] = print) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            announce(f"signal {name}: saving at the next rollout boundary, then stopping")
            self.request(name)

        for signum in signums:
            signal.signal(signum, handler)


@dataclass(frozen=True)
class Step:
    """One step of the story: train rollout `rollout_id`, or evaluate the policy after it."""

    kind: Literal["train", "eval"]
    rollout_id: int


@dataclass(frozen=True)
class LoopOutcome:
    """How `run` ended: `finished` (the last rollout is done) or stopped on request after `last_rollout`."""

    finished: bool
    last_rollout: int | None


@dataclass
class RolloutLoop:
    """The rollouts `start .. plan.num_rollout - 1` of one session, and the evals they owe."""

    session: Session
    plan: RunPlan
    recorder: Recorder
    start: int
    pending_evals: tuple[int, ...] = ()
    logged_rollouts: set[int] = field(default_factory=set)
    logged_evals: set[int] = field(default_factory=set)
    stop: StopRequest = field(default_factory=StopRequest)
    failures: FailureLog | None = None
    #: A rollout of this session trained since its last save (a stop must save it first).
    unsaved: bool = False
    last_rollout: int | None = None

    @staticmethod
    def evals_owed(plan: RunPlan, *, start: int, logged_evals: set[int]) -> tuple[int, ...]:
        """Evals due before the first rollout of a session: the eval before training on a fresh
        run; on resume, the eval after `start - 1` when it was due and never logged (a crash
        between the save and the eval)."""
        if start == 0:
            return (0,) if plan.eval_before_train and 0 not in logged_evals else ()
        before = start - 1
        return (before,) if plan.is_eval_due(before) and before not in logged_evals else ()

    # ---- the story -----------------------------------------------------------------------
    def steps(self) -> Iterator[Step]:
        """The steps still to run, decided lazily: a stop request is seen at the next boundary."""
        for rollout_id in self.pending_evals:
            if self.stop.requested:
                return  # an owed eval is not lost: it is still unlogged when the run resumes
            yield Step("eval", rollout_id)
        for rollout_id in range(self.start, self.plan.num_rollout):
            if self.stop.requested and not self.unsaved:
                return
            yield Step("train", rollout_id)
            if self.plan.is_eval_due(rollout_id):
                yield Step("eval", rollout_id)

    def run(self) -> LoopOutcome:
        """Every step, in this process."""
        for step in self.steps():
            if step.kind == "train":
                self.train(step.rollout_id)
            else:
                self.evaluate(step.rollout_id)
        return self.outcome()

    def outcome(self) -> LoopOutcome:
        return LoopOutcome(finished=self.last_rollout == self.plan.num_rollout - 1 or self.start >= self.plan.num_rollout,
                           last_rollout=self.last_rollout)

    # ---- one step --------------------------------------------------------------------------
    def save_decision(self, rollout_id: int) -> tuple[bool, bool]:
        """`(save, force_sync)`: save on the schedule or when a stop is requested; a requested save
        and the final one are synchronous (nothing may be left in flight when the process ends)."""
        final = rollout_id == self.plan.num_rollout - 1
        save = self.plan.is_save_due(rollout_id) or self.stop.requested
        return save, self.stop.requested or final

    def train(self, rollout_id: int) -> RolloutResult:
        save, force_sync = self.save_decision(rollout_id)
        started = time.perf_counter()
        result = self._call("train_rollout", rollout_id,
                            lambda: self.session.train_rollout(rollout_id, save=save, force_sync=force_sync))
        result = self.recorder.rollout(result, step_time=time.perf_counter() - started,
                                       log_metrics=rollout_id not in self.logged_rollouts)
        self.logged_rollouts.add(rollout_id)
        self.unsaved = result.checkpoint is None
        self.last_rollout = rollout_id
        return result

    def evaluate(self, rollout_id: int) -> EvalResult:
        result = self._call("evaluate", rollout_id, lambda: self.session.evaluate(rollout_id))
        result = self.recorder.eval(result, log_metrics=rollout_id not in self.logged_evals)
        self.logged_evals.add(rollout_id)
        return result

    def _call(self, stage: str, rollout_id: int, call: Callable[[], _R]) -> _R:
        """Run a session call; the same failure at the same rollout twice is permanent."""
        try:
            return call()
        except (SessionLost, PermanentFailure):
            raise
        except Exception as exc:
            if self.failures is not None and self.failures(stage, rollout_id, f"{type(exc).__name__}: {exc}") >= 2:
                raise PermanentFailure(f"{stage} {rollout_id} failed twice the same way: "
                                       f"{type(exc).__name__}: {exc}") from exc
            raise
