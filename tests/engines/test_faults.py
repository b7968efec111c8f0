"""The fault seam (`kimi_core.faults`) and the test hooks of `tests.faults` that plug into it."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kimi_core import faults
from kimi_core.faults import FAULT_HOOK_ENV, fault_hook, fault_point, install_fault_hook
from tests import faults as test_faults
from tests.faults import AT_SAVE_ENV, AT_TRAIN_ENV, MODE_ENV, InjectedFault, chain, raise_once

CALLS: list[tuple[str, dict[str, Any]]] = []


def record(name: str, **context: Any) -> None:
    """A hook for `$KIMI_GRPO_FAULT_HOOK`: remembers each call."""
    CALLS.append((name, context))


@pytest.fixture(autouse=True)
def no_hook(monkeypatch: pytest.MonkeyPatch):
    """Each test starts with no hook: none installed in-process, none in the environment."""
    monkeypatch.delenv(FAULT_HOOK_ENV, raising=False)
    previous = install_fault_hook(None)
    CALLS.clear()
    yield
    install_fault_hook(previous)


def run_paths(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(run_dir=tmp_path)


def test_a_fault_point_without_a_hook_does_nothing():
    fault_point("save.mid", rollout_id=3, paths=None)


def test_an_in_process_hook_is_scoped_and_sees_the_point_and_its_context():
    with fault_hook(record):
        fault_point("train.mid", rollout_id=1)
        with fault_hook(raise_once("train.mid", 1)):
            with pytest.raises(InjectedFault):
                fault_point("train.mid", rollout_id=1)
            fault_point("train.mid", rollout_id=1)  # once only
        fault_point("save.mid", rollout_id=2)
    fault_point("save.mid", rollout_id=9)  # uninstalled
    assert CALLS == [("train.mid", {"rollout_id": 1}), ("save.mid", {"rollout_id": 2})]


def test_the_environment_names_a_hook_imported_once(monkeypatch: pytest.MonkeyPatch):
    module = __name__ if __name__ in sys.modules else "tests.engines.test_faults"
    monkeypatch.setenv(FAULT_HOOK_ENV, f"{module}:record")
    fault_point("save.mid", rollout_id=0)
    loaded = faults._from_env
    fault_point("save.mid", rollout_id=1)
    assert faults._from_env is loaded  # cached: not imported again
    assert [c[1]["rollout_id"] for c in CALLS] == [0, 1]
    with fault_hook(chain()):  # an in-process hook takes precedence
        fault_point("save.mid", rollout_id=2)
    assert len(CALLS) == 2


@pytest.mark.parametrize("spec", ["no_colon", ":record", "tests.faults:", "tests.faults:MODES"])
def test_a_malformed_hook_variable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, spec: str):
    monkeypatch.setenv(FAULT_HOOK_ENV, spec)
    with pytest.raises((ValueError, TypeError), match=FAULT_HOOK_ENV):
        fault_point("save.mid", rollout_id=0)


def test_the_env_driven_test_hooks_raise_or_pause_once_per_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    paths = run_paths(tmp_path)
    monkeypatch.setenv(FAULT_HOOK_ENV, "tests.faults:at_train")
    monkeypatch.setenv(AT_TRAIN_ENV, "2")
    monkeypatch.setenv(MODE_ENV, "raise")
    fault_point("train.mid", rollout_id=1, paths=paths)  # another rollout
    fault_point("save.mid", rollout_id=2, paths=paths)  # another point
    with pytest.raises(ConnectionError, match="train.mid of rollout 2"):
        fault_point("train.mid", rollout_id=2, paths=paths)
    assert (tmp_path / ".fault-at-train-2").is_file()
    fault_point("train.mid", rollout_id=2, paths=paths)  # the marker: once per run

    slept: list[float] = []
    monkeypatch.setattr(test_faults.time, "sleep", slept.append)
    monkeypatch.setenv(FAULT_HOOK_ENV, "tests.faults:at_save")
    monkeypatch.setenv(AT_SAVE_ENV, "3")
    monkeypatch.setenv(MODE_ENV, "pause")
    fault_point("save.mid", rollout_id=3, paths=paths)
    fault_point("save.mid", rollout_id=3, paths=paths)
    assert slept == [test_faults.PAUSE_S]
    assert (tmp_path / ".fault-at-save-3").is_file()

    monkeypatch.setenv(AT_SAVE_ENV, "4")
    monkeypatch.setenv(MODE_ENV, "explode")
    with pytest.raises(ValueError, match=MODE_ENV):
        fault_point("save.mid", rollout_id=4, paths=paths)
