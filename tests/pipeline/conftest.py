"""Helpers for end-to-end runs of the local pipeline through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "flows.cli"]
# A small, fast version of the local recipe: 6 rollouts, saves after 1, 3, 5, eval before 0 and after 2, 5.
SMALL = [
    "--num-rollout", "6",
    "--set", "model.warmup.steps=20",
    "--set", "rollout.rollout_batch_size=8",
    "--set", "rollout.n_samples_per_prompt=8",
    "--set", "rollout.global_batch_size=64",
    "--set", "checkpoint.save_interval=2",
    "--set", "eval.interval=3",
]


def cli_env(prefect: dict[str, str], **extra: str) -> dict[str, str]:
    env = {**os.environ, **prefect, "PYTHONUNBUFFERED": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_cli(args: list[str], env: dict[str, str], *, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-8000:])
    return proc


@pytest.fixture()
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("base")
