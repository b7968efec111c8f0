"""Deterministic prompt order: a permutation per epoch, seeded by (seed, epoch), and a cursor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PromptCursor:
    """Where the run is in its training data: epoch and offset into that epoch's permutation."""

    epoch: int = 0
    offset: int = 0


class PromptSampler:
    """Draws prompt rows in the order an uninterrupted run would, whatever the resume point.

    Epoch `e` visits `rows` in `randperm(len(rows), seed = seed * 1_000_003 + e)` order when
    `shuffle` is on (in file order otherwise); a draw that crosses the end of an epoch continues
    with the next epoch's permutation.
    """

    def __init__(self, rows: list[dict[str, Any]], *, seed: int, shuffle: bool):
        if not rows:
            raise ValueError("the training data set is empty")
        self.rows = rows
        self.seed = seed
        self.shuffle = shuffle
        self.cursor = PromptCursor()
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=gen).tolist()

    def draw(self, count: int) -> list[dict[str, Any]]:
        """The next `count` rows."""
        out = []
        for _ in range(count):
            if self.cursor.offset == len(self._order):
                self.cursor = PromptCursor(epoch=self.cursor.epoch + 1, offset=0)
                self._order = self._permutation(self.cursor.epoch)
            out.append(self.rows[self._order[self.cursor.offset]])
            self.cursor.offset += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.cursor.epoch, "offset": self.cursor.offset, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_rows"] != len(self.rows):
            raise ValueError(
                f"the checkpoint's data position is for {state['num_rows']} rows but the data set has "
                f"{len(self.rows)}: the training data changed since the checkpoint was written"
            )
        self.cursor = PromptCursor(epoch=state["epoch"], offset=state["offset"])
        self._order = self._permutation(self.cursor.epoch)
