"""Checkpoint reconcile before miles starts (docs/design.md §4, §5).

miles decides at parse time whether to resume (`--load` holding the tracker
`latest_checkpointed_iteration.txt`), loads the Megatron checkpoint of the tracked iteration and
then the data position `rollout/global_dataset_state_dict_{i}.pt` (`create_training_models`, then
`RolloutManager.load`, miles/ray/placement_group.py @31f1ca961). Its save order is the Megatron
checkpoint with the tracker first, the data position second (`save_model`, then
`RolloutManager.save`, train.py @31f1ca961), and miles only logs a missing data position (it would
restart the prompts at offset 0). So a crash between the two leaves a tracker that points at a
checkpoint without its data position. `reconcile_checkpoints` repairs the directory before the
parse, with real files only:

- an `iter_j` newer than the tracker (an unfinished or uncommitted save) is moved aside into
  `checkpoints/untracked/`, so nothing can mistake it for the latest;
- a tracked iteration without its data position rewinds the tracker (atomically) to the newest
  iteration that has both, or raises `CheckpointError` when there is none.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from kimi_core.atomic import write_text_atomic
from kimi_core.run_state import CheckpointError, RunPaths, checkpoint_dir, dataset_state_path

#: Where iterations newer than the tracker are moved (inside the run's checkpoints dir).
UNTRACKED_DIR = "untracked"
_ITER = re.compile(r"^iter_(\d{7})$")


@dataclass(frozen=True)
class Reconciled:
    """What `reconcile_checkpoints` found and repaired."""

    tracked: int | None  # the tracker before the repair
    latest: int | None  # the tracker after it: the checkpoint miles will load (None: a fresh start)
    moved_aside: tuple[Path, ...]  # where the untracked iterations went

    @property
    def rewound(self) -> bool:
        return self.tracked != self.latest

    @property
    def start(self) -> int:
        """The first rollout of the session: latest + 1, or 0."""
        return 0 if self.latest is None else self.latest + 1


def _read_tracker(paths: RunPaths) -> int | None:
    if not paths.tracker.is_file():
        return None
    text = paths.tracker.read_text(encoding="utf-8").strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{paths.tracker} should hold a rollout id, found {text[:40]!r}") from None


def _iterations(paths: RunPaths) -> dict[int, Path]:
    if not paths.checkpoints.is_dir():
        return {}
    found: dict[int, Path] = {}
    for entry in paths.checkpoints.iterdir():
        match = _ITER.match(entry.name)
        if match and entry.is_dir():
            found[int(match.group(1))] = entry
    return found


def _complete(paths: RunPaths, rollout_id: int) -> bool:
    return checkpoint_dir(paths, rollout_id).is_dir() and dataset_state_path(paths, rollout_id).is_file()


def reconcile_checkpoints(paths: RunPaths) -> Reconciled:
    """Make the tracker name a complete checkpoint and move newer iterations aside (module docstring)."""
    tracked = _read_tracker(paths)
    latest = tracked
    if latest is not None and not _complete(paths, latest):
        older = [j for j in _iterations(paths) if j < latest and _complete(paths, j)]
        if not older:
            raise CheckpointError(
                f"{paths.tracker} names rollout {latest}, but {checkpoint_dir(paths, latest)} or its data position "
                f"{dataset_state_path(paths, latest)} is missing, and no older checkpoint is complete: restore them, "
                "or remove the tracker to start the run again from the initial weights")
        latest = max(older)
        write_text_atomic(paths.tracker, str(latest))
    moved: list[Path] = []
    stamp = time.time_ns()
    for rollout_id, path in sorted(_iterations(paths).items()):
        if latest is not None and rollout_id <= latest:
            continue
        target = paths.checkpoints / UNTRACKED_DIR / f"{path.name}.{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, target)
        moved.append(target)
    return Reconciled(tracked=tracked, latest=latest, moved_aside=tuple(moved))
