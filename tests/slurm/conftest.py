"""Fixtures for tests against the local Slurm cluster (tests/slurm/start-local-slurm.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

DEFAULT_STATE_DIR = "/tmp/kimi-slurm"  # the start script's default; override with KIMI_SLURM_STATE


def _read_env_file(path: Path) -> dict[str, str]:
    """`export KEY=VALUE` lines of the start script's env file."""
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export "):].split("=", 1)
            env[key] = value
    return env


def _daemon_alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def _cluster_problem(env: dict[str, str]) -> str | None:
    """None when both nodes answer and accounting works, else why not."""
    run_env = os.environ | env
    sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True,
                           env=run_env, timeout=30, check=False)
    if sinfo.returncode != 0:
        return f"sinfo failed: {sinfo.stderr.strip()}"
    states = dict(line.split(None, 1) for line in sinfo.stdout.splitlines() if line.strip())
    if not {"n1", "n2"} <= states.keys() or any("down" in s or "drain" in s for s in states.values()):
        return f"nodes n1 and n2 are not both up: {states}"
    sacct = subprocess.run(["sacct", "-n", "-X"], capture_output=True, text=True, env=run_env,
                           timeout=30, check=False)
    if sacct.returncode != 0:
        return f"accounting does not answer: {sacct.stderr.strip()}"
    return None


def _unavailable(reason: str) -> None:
    """Skip, or fail when the run requires the cluster (`.ci/run` sets KIMI_GRPO_REQUIRE_SLURM=1
    when its start script failed, so a broken cluster turns CI red instead of skipping)."""
    if os.environ.get("KIMI_GRPO_REQUIRE_SLURM") == "1":
        pytest.fail(f"the local Slurm cluster is required here: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """The local two-node cluster's environment (SLURM_CONF ...); skips when it is not running."""
    if shutil.which("sinfo") is None:
        _unavailable("Slurm is not installed (no sinfo); run tests/slurm/start-local-slurm.sh")
    state = Path(os.environ.get("KIMI_SLURM_STATE", DEFAULT_STATE_DIR))
    env_file = state / "env"
    if not env_file.is_file():
        _unavailable(f"local Slurm cluster not started ({env_file} missing); "
                    "run tests/slurm/start-local-slurm.sh")
    if not _daemon_alive(state / "run" / "slurmctld.pid"):
        _unavailable(f"local Slurm cluster is not running (no live slurmctld per {state}/run); "
                    "run tests/slurm/start-local-slurm.sh")
    env = _read_env_file(env_file)
    problem = _cluster_problem(env)
    if problem:
        _unavailable(f"local Slurm cluster is not up: {problem}; run tests/slurm/start-local-slurm.sh")
    queued = subprocess.run(["squeue", "-h", "-o", "%i %j %T %R"], capture_output=True, text=True,
                            env=os.environ | env, timeout=30, check=False).stdout.strip()
    if queued:  # the tests time Slurm jobs on both nodes: someone else's job would make them hang
        pytest.fail(f"the local Slurm cluster is not idle, jobs already queued:\n{queued}\n"
                    "cancel them (scancel) or restart it (tests/slurm/stop-local-slurm.sh, then start)")
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
