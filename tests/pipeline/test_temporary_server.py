"""`kimi-grpo run` without a Prefect server: the CLI's own temporary server (flows/temporary_server.py).

What a user relies on: README command (1) works with no Prefect set-up at all, the temporary server
is gone when the run ends, and a configured PREFECT_API_URL is used as it is (no server started).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.pipeline.conftest import CLI, REPO

TINY = [
    "--num-rollout", "2",
    "--set", "model.warmup.steps=20",
    "--set", "rollout.rollout_batch_size=4",
    "--set", "rollout.n_samples_per_prompt=4",
    "--set", "rollout.global_batch_size=16",
    "--set", "eval.before_train=false",
]


def no_prefect_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No API URL anywhere: a fresh Prefect home (no profile sets one) and none in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_without_a_prefect_server_uses_a_temporary_one_and_stops_it(tmp_path: Path) -> None:
    proc = subprocess.run([*CLI, "run", "configs/local.yaml", "--run-name", "temp", "--base-dir", str(tmp_path / "b"),
                           *TINY], cwd=REPO, env=no_prefect_env(tmp_path), capture_output=True, text=True,
                          timeout=280, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"Prefect: temporary server at\s+(http://127\.0\.0\.1:\d+/api)", proc.stdout)
    assert found, proc.stdout[-2000:]
    assert "finished at rollout 1" in proc.stdout
    assert not answers(found.group(1))  # stopped with the run


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_with_the_temporary_server_exits_130_promptly(tmp_path: Path) -> None:
    """Ctrl-C reaches the CLI's whole process group; the server, in a session of its own, outlives it
    long enough for the run's clean-up to report (in the CLI's group it died first: the clean-up
    failed with exit 1 and Prefect retried its last events for over a minute)."""
    log = tmp_path / "cli.log"
    args = ["run", "configs/local.yaml", "--run-name", "stopped", "--base-dir", str(tmp_path / "b"),
            *TINY, "--num-rollout", "20"]
    with log.open("w") as handle:
        proc = subprocess.Popen([*CLI, *args], cwd=REPO, env=no_prefect_env(tmp_path), stdout=handle,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while "rollout 2/" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert proc.poll() is None, log.read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGINT)
            stopped = time.monotonic()
            assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
            assert time.monotonic() - stopped < 30, f"took {time.monotonic() - stopped:.0f} s to exit"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    found = re.search(r"Prefect: temporary server at\s+(http://127\.0\.0\.1:\d+/api)", log.read_text())
    assert found and not answers(found.group(1))


PROBE = ("import psutil\n"
         "from flows.temporary_server import TemporaryPrefectServer as T\n"
         "print(T.start_if_needed(), len(psutil.Process().children()))\n")


@pytest.mark.parametrize("where", ["environment", "profile"])
def test_a_configured_api_url_starts_no_server(tmp_path: Path, where: str) -> None:
    """An API URL in the environment, or in the active Prefect profile: no server is left running."""
    url = "http://127.0.0.1:9/api"
    if where == "environment":
        env = no_prefect_env(tmp_path, PREFECT_API_URL=url)
    else:
        env = no_prefect_env(tmp_path)
        home = Path(env["PREFECT_HOME"])
        home.mkdir()
        (home / "profiles.toml").write_text(f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{url}"\n')
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.split() == ["None", "0"], out.stdout + out.stderr
