"""The engine protocol (docs/design.md §5): one rollout at a time, driven by a flow or a plain loop.

A rollout trains and, when asked, saves a checkpoint before it returns (as miles' train.py saves
between training and the weight push), so the caller never saves on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

#: File in each committed checkpoint directory: JSON `{str(rollout_id): metrics}` of the rollouts
#: trained since the previous save, the saving rollout included, so that a rollout saved after its
#: orchestrator died can still be logged when the run resumes (it is not trained again).
ROLLOUT_METRICS_FILE = "rollout_metrics.json"


class EngineBroken(RuntimeError):
    """The engine cannot be used again in this process (a failure after training began, a child
    actor's death, a phase that overran its timeout, or a closed engine).

    Every later call raises it too. The runtime treats it as a lost session (docs/design.md §3:
    bring the cluster up again and resume from the latest checkpoint), never as a retriable task
    failure: `kimi_core.runtime.session.EngineSession` re-raises it as `SessionLost`.
    """


@dataclass(frozen=True)
class TrackingTarget:
    """The MLflow run an engine that logs its own metrics (miles) attaches to (docs/design.md §10)."""

    tracking_uri: str
    experiment: str
    run_id: str


@dataclass(frozen=True)
class EngineInputs:
    """Files the engine reads: prepared data and the initial HF checkpoint; for the GPU engine also
    the reference weights made by `convert_checkpoint` and the MLflow run to log into."""

    train_data: str
    eval_data: dict[str, str]
    initial_checkpoint: str
    reference_checkpoint: str | None = None
    tracking: TrackingTarget | None = None


@dataclass(frozen=True)
class RolloutResult:
    """What one trained rollout produced."""

    rollout_id: int
    metrics: dict[str, float]  # miles names: rollout/..., train/..., perf/...
    checkpoint: str | None  # the committed checkpoint dir when this rollout saved, else None
    #: The engine logged its own metrics of this rollout to `EngineInputs.tracking` (miles): `metrics`
    #: holds only the driver's own, and the runtime reads the rest back from MLflow (never logs them).
    logged_by_engine: bool = False


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation produced."""

    rollout_id: int
    metrics: dict[str, float]  # eval/<name>, eval/<name>/pass_at_<k>, ...
    samples: tuple[dict[str, Any], ...]  # sample generations for the MLflow table
    logged_by_engine: bool = False  # as `RolloutResult.logged_by_engine`


class Engine(Protocol):
    """What the pipeline needs from a training engine."""

    def start(self, resume_from: int | None) -> int:
        """Load weights (the checkpoint of rollout `resume_from`, or the initial ones) and the data
        position and RNG states saved with them; return the first rollout id to run."""

    def train_rollout(self, rollout_id: int, *, save: bool, force_sync: bool) -> RolloutResult:
        """Generate, reward, filter, compute advantages and train rollout `rollout_id`.

        With `save`, write a complete checkpoint of the state after this rollout and commit it as
        the latest before returning (its path in `RolloutResult.checkpoint`); the checkpoint holds
        `ROLLOUT_METRICS_FILE`. `force_sync` asks an engine that saves asynchronously to finish the
        save before returning (a deadline or preemption save); a synchronous engine ignores it.

        A call that raises leaves the engine as it was before the call (data position, RNG states,
        weights, optimizer, unsaved metrics), so retrying the same rollout id trains exactly what
        an uninterrupted run would have.
        """

    def evaluate(self, rollout_id: int) -> EvalResult:
        """Evaluate the current policy on the eval sets (its own RNG: training is not perturbed)."""

    def close(self) -> None:
        """Release resources."""
