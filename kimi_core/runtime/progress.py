"""What the run prints: one console (stderr) and the live per-rollout progress line."""

from __future__ import annotations

import time

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)


class Progress:
    """One live line per rollout: reward, last eval, seconds per rollout, ETA."""

    def __init__(self, *, start: int, end: int):
        self.start, self.end = start, end
        self.started = time.perf_counter()
        self.last_eval = ""

    def eval(self, rollout_id: int, metrics: dict[str, float]) -> None:
        scores = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/") and k.count("/") == 1}
        self.last_eval = ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + f" (@{rollout_id})"
        console.print(f"eval @ rollout {rollout_id}: {self.last_eval}")

    def rollout(self, rollout_id: int, metrics: dict[str, float]) -> None:
        done = rollout_id + 1 - self.start
        per = (time.perf_counter() - self.started) / max(done, 1)
        eta = per * (self.end - rollout_id - 1)
        console.print(
            f"rollout {rollout_id + 1}/{self.end}  reward {metrics.get('rollout/raw_reward', float('nan')):.3f}"
            f"  | last eval {self.last_eval or '-'}  | {per:.1f} s/rollout  | ETA {eta:.0f} s"
        )
