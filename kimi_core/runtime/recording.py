"""Recorders for the rollout loop: the run's MLflow run + progress line, or a list in memory.

An engine that logs its own metrics (miles, `RolloutResult.logged_by_engine`) has already written
them to the run's MLflow run at step = rollout id, `train/*` at its own sub-steps
`rollout_id * k + j` (k = optimizer steps per rollout). `RunRecorder` then logs only what the
driver measured itself (`perf/step_time`, the engine's `perf/driver/*` timings, the checkpoint URI)
and reads the engine's metrics of that rollout back (`read_back`) for the task's return value and
the progress line: one metric is never logged twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kimi_core.engines.base import EvalResult, RolloutResult
from kimi_core.runtime.progress import Progress
from kimi_core.runtime.tracking import RunTracker

#: Wall seconds of one rollout as the orchestrator sees it, from the start of its step to just before
#: its metrics are logged (engine call and save included); the metric's MLflow timestamp marks that end.
STEP_TIME_METRIC = "perf/step_time"
#: Metrics an engine logs at its optimizer sub-steps (miles' `train/step` axis), not at the rollout id.
TRAIN_PREFIX = "train/"


def read_back(client: Any, run_id: str, rollout_id: int, *, train_steps_per_rollout: int,
              prefixes: Iterable[str] | None = None) -> dict[str, float]:
    """The metrics of rollout `rollout_id` in MLflow run `run_id`: each key at step `rollout_id`
    (`train/*`: the last of its sub-steps `rollout_id * k .. rollout_id * k + k - 1`); among
    duplicates at one step (a rollout redone after a crash) the latest logged wins.

    One `get_run` for the keys whose latest value is at that step (the usual case, right after
    the rollout); a key whose latest value lies beyond it (a later rollout an earlier, crashed
    attempt had logged) is read from its history, filtered by step.
    """
    k = max(train_steps_per_rollout, 1)
    wanted = tuple(prefixes) if prefixes is not None else None

    def window(key: str) -> range:
        return range(rollout_id * k, rollout_id * k + k) if key.startswith(TRAIN_PREFIX) else range(rollout_id,
                                                                                                     rollout_id + 1)

    latest: dict[str, tuple[int, int, float]] = {}  # key -> (step, timestamp, value) of the latest value
    for metric in client.get_run(run_id).data.to_proto().metrics:
        if wanted is None or metric.key.startswith(wanted):
            latest[metric.key] = (metric.step, metric.timestamp, metric.value)
    out: dict[str, float] = {}
    for key, (step, _ts, value) in latest.items():
        steps = window(key)
        if step in steps:
            out[key] = value
        elif step > steps[-1]:
            found = [(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key) if m.step in steps]
            if found:
                out[key] = max(found)[2]
    return out


class RunRecorder:
    """Logs to the run's MLflow run at step = rollout id, and prints the progress line.

    The reward / eval PNG plots are drawn when the run (or an attempt) ends, not per eval:
    rendering them costs more than a rollout of the local recipe.
    """

    def __init__(self, tracker: RunTracker, progress: Progress, *, train_steps_per_rollout: int = 1):
        self.tracker = tracker
        self.progress = progress
        self.train_steps_per_rollout = train_steps_per_rollout

    def read_back(self, rollout_id: int, prefixes: Iterable[str] | None = None) -> dict[str, float]:
        return read_back(self.tracker.client, self.tracker.run_id, rollout_id,
                         train_steps_per_rollout=self.train_steps_per_rollout, prefixes=prefixes)

    def rollout(self, result: RolloutResult, *, step_time: float, log_metrics: bool) -> RolloutResult:
        if log_metrics:
            self.tracker.log_metrics({**result.metrics, STEP_TIME_METRIC: step_time}, step=result.rollout_id)
        if result.checkpoint is not None:
            self.tracker.log_checkpoint_uri(result.rollout_id, result.checkpoint)
        if result.logged_by_engine:
            engine_logged = self.read_back(result.rollout_id, prefixes=("rollout/", "train/", "perf/"))
            result = dataclasses.replace(result, metrics={**engine_logged, **result.metrics})
        self.progress.rollout(result.rollout_id, result.metrics)
        return result

    def eval(self, result: EvalResult, *, log_metrics: bool) -> EvalResult:
        if log_metrics and not result.logged_by_engine:
            self.tracker.log_metrics(result.metrics, step=result.rollout_id)
        if result.samples:
            self.tracker.log_table(result.samples, f"eval/samples_rollout_{result.rollout_id:07d}.json")
        if result.logged_by_engine:
            result = dataclasses.replace(result, metrics={**self.read_back(result.rollout_id, prefixes=("eval/",)),
                                                          **result.metrics})
        self.progress.eval(result.rollout_id, result.metrics)
        return result


@dataclass
class MemoryRecorder:
    """Keeps every result in order (benchmarks and tests of the loop); optionally prints progress."""

    rollouts: list[tuple[RolloutResult, float]] = field(default_factory=list)
    evals: list[EvalResult] = field(default_factory=list)
    progress: Progress | None = None

    def rollout(self, result: RolloutResult, *, step_time: float, log_metrics: bool) -> RolloutResult:
        self.rollouts.append((result, step_time))
        if self.progress is not None:
            self.progress.rollout(result.rollout_id, result.metrics)
        return result

    def eval(self, result: EvalResult, *, log_metrics: bool) -> EvalResult:
        self.evals.append(result)
        if self.progress is not None:
            self.progress.eval(result.rollout_id, result.metrics)
        return result
