"""Session-wide test fixtures: the shared data directory and common environment settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Real services (MLflow server, Ray head), started once per session when a test asks for them.
pytest_plugins = ["tests.fixtures.services"]


def shared_data_dir() -> Path | None:
    """The real data sets beside the checkout (`../shared/data`), or `$KIMI_GRPO_SHARED_DATA`."""
    candidates = [os.environ.get("KIMI_GRPO_SHARED_DATA"), REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "dapo-math-17k").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the real data sets; skips the test when they are not beside this checkout."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data sets not found: ../shared/data is absent (set KIMI_GRPO_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
