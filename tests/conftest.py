"""Session-wide test fixtures: the shared data directory and common environment settings."""

from __future__ import annotations

import importlib
import os
from functools import cache
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


@cache
def _miles_missing() -> str | None:
    """Why miles cannot be imported here, or None (imported only when a `miles` test is collected)."""
    try:
        importlib.import_module("miles")
    except Exception as exc:
        return f"needs the miles container: `import miles` failed ({type(exc).__name__}: {exc})"
    return None


@cache
def _gpu_missing() -> str | None:
    try:
        import torch  # only when a `gpu` test is collected
    except ImportError:
        return "needs a CUDA GPU: torch is not installed"
    return None if torch.cuda.is_available() else "needs a CUDA GPU: torch.cuda.is_available() is False"


def _cluster_missing() -> str | None:
    if os.environ.get("KIMI_GRPO_CLUSTER_TESTS") == "1":
        return None
    return "needs a GPU cluster: set KIMI_GRPO_CLUSTER_TESTS=1 on one (inside the miles container)"


#: marker -> why its tests cannot run here (None: they can). Reasons show in the `-ra` summary.
_REQUIREMENTS = {"gpu": _gpu_missing, "cluster": _cluster_missing, "miles": _miles_missing}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker, missing in _REQUIREMENTS.items():
            if item.get_closest_marker(marker) is not None and (reason := missing()) is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
                break


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
