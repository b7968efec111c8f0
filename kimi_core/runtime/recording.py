"""Recorders for the rollout loop: the run's MLflow run + progress line, or a list in memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from kimi_core.engines.base import EvalResult, RolloutResult
from kimi_core.runtime.progress import Progress
from kimi_core.runtime.tracking import RunTracker

#: Wall seconds of one rollout as the orchestrator sees it, from the start of its step to just before
#: its metrics are logged (engine call and save included); the metric's MLflow timestamp marks that end.
STEP_TIME_METRIC = "perf/step_time"


class RunRecorder:
    """Logs to the run's MLflow run at step = rollout id, and prints the progress line.

    The reward / eval PNG plots are drawn when the run (or an attempt) ends, not per eval:
    rendering them costs more than a rollout of the local recipe.
    """

    def __init__(self, tracker: RunTracker, progress: Progress):
        self.tracker = tracker
        self.progress = progress

    def rollout(self, result: RolloutResult, *, step_time: float, log_metrics: bool) -> None:
        if log_metrics:
            self.tracker.log_metrics({**result.metrics, STEP_TIME_METRIC: step_time}, step=result.rollout_id)
        if result.checkpoint is not None:
            self.tracker.log_checkpoint_uri(result.rollout_id, result.checkpoint)
        self.progress.rollout(result.rollout_id, result.metrics)

    def eval(self, result: EvalResult, *, log_metrics: bool) -> None:
        if log_metrics:
            self.tracker.log_metrics(result.metrics, step=result.rollout_id)
        if result.samples:
            self.tracker.log_table(result.samples, f"eval/samples_rollout_{result.rollout_id:07d}.json")
        self.progress.eval(result.rollout_id, result.metrics)


@dataclass
class MemoryRecorder:
    """Keeps every result in order (benchmarks and tests of the loop); optionally prints progress."""

    rollouts: list[tuple[RolloutResult, float]] = field(default_factory=list)
    evals: list[EvalResult] = field(default_factory=list)
    progress: Progress | None = None

    def rollout(self, result: RolloutResult, *, step_time: float, log_metrics: bool) -> None:
        self.rollouts.append((result, step_time))
        if self.progress is not None:
            self.progress.rollout(result.rollout_id, result.metrics)

    def eval(self, result: EvalResult, *, log_metrics: bool) -> None:
        self.evals.append(result)
        if self.progress is not None:
            self.progress.eval(result.rollout_id, result.metrics)
