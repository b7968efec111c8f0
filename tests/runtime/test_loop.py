"""The one rollout loop's decisions: steps, save decision, stop request, logging once, failures.

The session here is `ScriptedSession`, a recording stand-in for an engine session: these tests
are about the loop's bookkeeping, which is the same whatever engine does the work (the engine
itself is tested in tests/engines, the loop over real engines in tests/pipeline and the benchmarks).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import pytest

from kimi_core.engines.base import EvalResult, RolloutResult
from kimi_core.recipe import RunPlan
from kimi_core.runtime.failures import PermanentFailure, SessionLost
from kimi_core.runtime.loop import RolloutLoop, Step, StopRequest
from kimi_core.runtime.recording import MemoryRecorder


def plan(*, num_rollout: int, save_after: tuple[int, ...], eval_after: tuple[int, ...],
         eval_before_train: bool = True) -> RunPlan:
    return RunPlan(world_size=1, data_parallel=1, expert_data_parallel=1, layers_per_stage=(1,), num_sglang_engines=1,
                   samples_per_rollout=1, global_batch_size=1, steps_per_rollout=1, num_rollout=num_rollout,
                   dataset_rows=None, rollouts_per_epoch=None, eval_before_train=eval_before_train,
                   eval_after=eval_after, save_after=save_after)


@dataclass
class ScriptedSession:
    """Records every call; `fail` maps ("train"|"eval", rollout_id) to errors raised once each."""

    calls: list[tuple[str, int, bool, bool]] = field(default_factory=list)
    fail: dict[tuple[str, int], list[Exception]] = field(default_factory=dict)
    on_train: dict[int, StopRequest] = field(default_factory=dict)

    def train_rollout(self, rollout_id: int, *, save: bool, force_sync: bool) -> RolloutResult:
        self.calls.append(("train", rollout_id, save, force_sync))
        if errors := self.fail.get(("train", rollout_id)):
            raise errors.pop(0)
        if rollout_id in self.on_train:  # a signal that arrives while this rollout trains
            self.on_train[rollout_id].request("SIGUSR1")
        return RolloutResult(rollout_id, {"rollout/raw_reward": 0.5}, f"ckpt-{rollout_id}" if save else None)

    def evaluate(self, rollout_id: int) -> EvalResult:
        self.calls.append(("eval", rollout_id, False, False))
        if errors := self.fail.get(("eval", rollout_id)):
            raise errors.pop(0)
        return EvalResult(rollout_id, {"eval/arith": 0.25}, ())


SIX = plan(num_rollout=6, save_after=(1, 3, 5), eval_after=(2, 5))


def test_fresh_run_follows_the_schedule() -> None:
    session, recorder = ScriptedSession(), MemoryRecorder()
    loop = RolloutLoop(session=session, plan=SIX, recorder=recorder, start=0,
                       pending_evals=RolloutLoop.evals_owed(SIX, start=0, logged_evals=set()))
    outcome = loop.run()
    assert outcome.finished and outcome.last_rollout == 5
    assert session.calls == [
        ("eval", 0, False, False),
        ("train", 0, False, False), ("train", 1, True, False), ("train", 2, False, False), ("eval", 2, False, False),
        ("train", 3, True, False), ("train", 4, False, False), ("train", 5, True, True), ("eval", 5, False, False),
    ]
    assert [r.rollout_id for r, _ in recorder.rollouts] == list(range(6))
    assert [e.rollout_id for e in recorder.evals] == [0, 2, 5]


def test_resume_replays_an_owed_eval_and_logs_nothing_twice() -> None:
    # rollout 2 was saved and its eval never logged; rollouts 0-3 are already in MLflow
    owed = RolloutLoop.evals_owed(SIX, start=3, logged_evals={0})
    assert owed == (2,)
    assert RolloutLoop.evals_owed(SIX, start=3, logged_evals={0, 2}) == ()
    assert RolloutLoop.evals_owed(SIX, start=0, logged_evals={0}) == ()
    assert RolloutLoop.evals_owed(plan(num_rollout=6, save_after=(5,), eval_after=(), eval_before_train=False),
                                  start=0, logged_evals=set()) == ()

    logged: list[tuple[int, bool]] = []

    class Recorder(MemoryRecorder):
        def rollout(self, result: RolloutResult, *, step_time: float, log_metrics: bool) -> RolloutResult:
            logged.append((result.rollout_id, log_metrics))
            return result

    session = ScriptedSession()
    loop = RolloutLoop(session=session, plan=SIX, recorder=Recorder(), start=3, pending_evals=owed,
                       logged_rollouts={0, 1, 2, 3})
    loop.run()
    assert [c[:2] for c in session.calls] == [("eval", 2), ("train", 3), ("train", 4), ("train", 5), ("eval", 5)]
    assert logged == [(3, False), (4, True), (5, True)]  # rollout 3's metrics are in MLflow already


def test_stop_request_saves_at_the_next_boundary_then_stops() -> None:
    stop = StopRequest()
    session = ScriptedSession(on_train={2: stop})  # the signal arrives while rollout 2 trains (no save due)
    loop = RolloutLoop(session=session, plan=SIX, recorder=MemoryRecorder(), start=0, stop=stop)
    outcome = loop.run()
    # rollout 2 was not saved: rollout 3 runs with a requested, synchronous save, then the loop stops
    assert [c for c in session.calls if c[0] == "train"][-2:] == [("train", 2, False, False), ("train", 3, True, True)]
    assert not outcome.finished and outcome.last_rollout == 3


def test_stop_right_after_a_save_starts_no_rollout() -> None:
    stop = StopRequest()
    session = ScriptedSession(on_train={1: stop})  # rollout 1 saves on the schedule
    outcome = RolloutLoop(session=session, plan=SIX, recorder=MemoryRecorder(), start=0, stop=stop).run()
    assert [c[1] for c in session.calls if c[0] == "train"] == [0, 1]
    assert outcome.last_rollout == 1 and not outcome.finished


def test_stop_requested_before_the_first_rollout_runs_nothing() -> None:
    stop = StopRequest()
    stop.request("SIGTERM")
    session = ScriptedSession()
    outcome = RolloutLoop(session=session, plan=SIX, recorder=MemoryRecorder(), start=0, pending_evals=(0,),
                          stop=stop).run()
    assert session.calls == [] and outcome.last_rollout is None and not outcome.finished


def test_stop_request_from_a_real_signal() -> None:
    stop = StopRequest()
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        stop.install((signal.SIGUSR1,), announce=lambda line: None)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.reason == "SIGUSR1"
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_steps_are_decided_lazily_for_the_flow() -> None:
    session, stop = ScriptedSession(), StopRequest()
    loop = RolloutLoop(session=session, plan=SIX, recorder=MemoryRecorder(), start=4, stop=stop)
    steps = loop.steps()
    assert next(steps) == Step("train", 4)
    loop.train(4)
    stop.request("deadline")  # arrives between two tasks: the next rollout saves, then the story ends
    assert next(steps) == Step("train", 5)
    loop.train(5)
    assert next(steps) == Step("eval", 5)
    assert list(steps) == []


def test_the_same_failure_twice_at_a_rollout_is_permanent() -> None:
    failures: list[tuple[str, int, str]] = []

    def record(stage: str, rollout_id: int, error: str) -> int:
        failures.append((stage, rollout_id, error))
        return failures.count((stage, rollout_id, error))

    session = ScriptedSession(fail={("train", 0): [ConnectionError("lost"), ConnectionError("lost")],
                                    ("eval", 0): [SessionLost("actor died")]})
    loop = RolloutLoop(session=session, plan=SIX, recorder=MemoryRecorder(), start=0, failures=record)
    with pytest.raises(ConnectionError):
        loop.train(0)  # first time: re-raised as itself (a transient error, retried by Prefect)
    with pytest.raises(PermanentFailure, match="train_rollout 0 failed twice the same way"):
        loop.train(0)
    with pytest.raises(SessionLost):
        loop.evaluate(0)  # a lost session is not counted: the flow reopens it
    assert failures == [("train_rollout", 0, "ConnectionError: lost")] * 2
