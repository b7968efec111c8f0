"""Test-only fault hooks for the seam of `kimi_core.faults`.

In another process (a Ray actor, a CLI subprocess) install one through the environment:

    KIMI_GRPO_FAULT_HOOK=tests.faults:at_save   KIMI_TEST_FAULT_AT_SAVE=3   [KIMI_TEST_FAULT_MODE=pause]
    KIMI_GRPO_FAULT_HOOK=tests.faults:at_train  KIMI_TEST_FAULT_AT_TRAIN=3  [KIMI_TEST_FAULT_MODE=raise]

(`PYTHONPATH` must reach the repository root so that `tests.faults` imports.) The hook fires at the
named point (`save.mid` / `train.mid`) of that rollout id, once per run: it first writes the marker
file `<run_dir>/.fault-at-save-<id>` (`.fault-at-train-<id>`) and never fires while it exists.
`KIMI_TEST_FAULT_MODE` says what it does:

- `kill` (default): SIGKILL its own process;
- `pause`: sleep up to `PAUSE_S` (600 s) there, then carry on, so that a test can kill the whole
  machine's processes mid-save;
- `raise`: raise a `ConnectionError` (a transient error: the same call retried succeeds);
- `hold`: wait there until the test creates `<marker>.release` (at most `PAUSE_S`), then carry on,
  so that a test can act at a known point of a rollout (e.g. signal the Ray job mid-rollout).

In-process, `raise_once(point, rollout_id)` builds a hook for `kimi_core.faults.fault_hook`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

#: Environment variable: rollout id whose `save.mid` point fires (hook `at_save`).
AT_SAVE_ENV = "KIMI_TEST_FAULT_AT_SAVE"
#: Environment variable: rollout id whose `train.mid` point fires (hook `at_train`).
AT_TRAIN_ENV = "KIMI_TEST_FAULT_AT_TRAIN"
#: Environment variable: `kill` (default), `pause` or `raise`.
MODE_ENV = "KIMI_TEST_FAULT_MODE"
MODES = ("kill", "pause", "raise", "hold")
PAUSE_S = 600.0


class InjectedFault(ConnectionError):
    """The transient error a test injected (a ConnectionError, as a lost connection would raise)."""


def at_save(name: str, *, rollout_id: int, paths: Any, **context: Any) -> None:
    """Hook: the fault of `$KIMI_TEST_FAULT_MODE` at `save.mid` of rollout `$KIMI_TEST_FAULT_AT_SAVE`."""
    _fire_once(name, "save.mid", AT_SAVE_ENV, rollout_id=rollout_id, run_dir=Path(paths.run_dir))


def at_train(name: str, *, rollout_id: int, paths: Any, **context: Any) -> None:
    """Hook: the fault of `$KIMI_TEST_FAULT_MODE` at `train.mid` of rollout `$KIMI_TEST_FAULT_AT_TRAIN`."""
    _fire_once(name, "train.mid", AT_TRAIN_ENV, rollout_id=rollout_id, run_dir=Path(paths.run_dir))


def marker_path(run_dir: Path, point: str, rollout_id: int) -> Path:
    """`<run_dir>/.fault-at-<save|train>-<rollout_id>`: present once the fault has fired in this run."""
    return run_dir / f".fault-at-{point.split('.')[0]}-{rollout_id}"


def release_path(marker: Path) -> Path:
    """The file that lets a `hold` fault at `marker` carry on."""
    return marker.with_name(marker.name + ".release")


def _fire_once(name: str, point: str, env: str, *, rollout_id: int, run_dir: Path) -> None:
    if name != point or os.environ.get(env) != str(rollout_id):
        return
    mode = os.environ.get(MODE_ENV, "kill")
    if mode not in MODES:
        raise ValueError(f"${MODE_ENV}={mode!r}: expected one of {MODES}")
    marker = marker_path(run_dir, point, rollout_id)
    if marker.exists():
        return
    marker.touch()
    if mode == "pause":
        time.sleep(PAUSE_S)
    elif mode == "hold":
        release, deadline = release_path(marker), time.monotonic() + PAUSE_S
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    elif mode == "raise":
        raise InjectedFault(f"injected transient fault at {point} of rollout {rollout_id}")
    else:
        os.kill(os.getpid(), signal.SIGKILL)


class raise_once:
    """In-process hook: raise `InjectedFault` the first time `point` is reached for `rollout_id`."""

    def __init__(self, point: str, rollout_id: int):
        self.point = point
        self.rollout_id = rollout_id
        self.fired = 0

    def __call__(self, name: str, **context: Any) -> None:
        if name == self.point and context.get("rollout_id") == self.rollout_id and not self.fired:
            self.fired += 1
            raise InjectedFault(f"injected transient fault at {name} of rollout {self.rollout_id}")


def chain(*hooks: Any) -> Any:
    """One hook that calls each of `hooks` in turn (the first that raises wins)."""

    def hook(name: str, **context: Any) -> None:
        for each in hooks:
            each(name, **context)

    return hook
