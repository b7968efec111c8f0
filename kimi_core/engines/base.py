"""The engine protocol (DESIGN §5): one rollout at a time, driven by a flow or a plain loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class EngineInputs:
    """Files the engine reads: prepared data and the initial HF checkpoint."""

    train_data: str
    eval_data: dict[str, str]
    initial_checkpoint: str


class Engine(Protocol):
    """What the pipeline needs from a training engine."""

    def start(self, resume_from: int | None) -> int:
        """Load weights (the checkpoint of rollout `resume_from`, or the initial ones); return the
        first rollout id to run."""

    def train_rollout(self, rollout_id: int) -> dict[str, float]:
        """Generate, reward, filter, compute advantages and train; return metrics (miles names)."""

    def evaluate(self, rollout_id: int) -> dict[str, float]:
        """Evaluate the current policy on the eval sets; return `eval/<name>...` metrics."""

    def save(self, rollout_id: int) -> str:
        """Write a complete checkpoint after `rollout_id` and mark it the latest; return its path."""

    def close(self) -> None:
        """Release resources."""
