"""The Slurm preflight: what it refuses, with fake Slurm commands, and through the CLI on the local cluster.

A refused run exits 2 with one line naming the key or command and the fix, and submits nothing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from flows.checks import check_scheduler
from kimi_core.recipe import Recipe, load_recipe
from kimi_core.runtime.failures import NotRunnableHere
from slurm import checks
from slurm.checks import SlurmUnavailable, check_slurm

REPO = Path(__file__).resolve().parents[2]
LOCAL_RECIPE = "configs/local.yaml"
SLEEP = shutil.which("sleep")  # found before a test narrows PATH to its fake Slurm


def slurm_recipe(**cluster: object) -> Recipe:
    """The local recipe on the localhost-slurm profile, with `cluster.KEY=VALUE` overrides."""
    overrides = [f"cluster.{key}={value}" for key, value in cluster.items()]
    return load_recipe(str(REPO / LOCAL_RECIPE), overrides=overrides, cluster="localhost-slurm", base_dir="/b")


def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, partitions: dict[str, tuple[str, list[int]]],
               sinfo: str | None = None, missing: tuple[str, ...] = ()) -> None:
    """Slurm commands on a PATH of their own: `sinfo` answers for `partitions` (name -> (availability,
    node counts per line)), or runs the shell code `sinfo` instead; the others do nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cases = [f"'-h -o %R') printf '%s\\n' {' '.join(partitions)} ;;"]
    for name, (avail, counts) in partitions.items():
        cases.append(f"'-h -p {name} -o %a') printf '%s\\n' {' '.join([avail] * len(counts))} ;;")
        cases.append(f"'-h -p {name} -o %D') printf '%s\\n' {' '.join(map(str, counts))} ;;")
    body = sinfo or 'case "$*" in\n' + "\n".join(cases) + "\n*) exit 0 ;;\nesac"
    for name in checks.SLURM_COMMANDS:
        if name not in missing:
            (bin_dir / name).write_text("#!/bin/bash\n" + (body if name == "sinfo" else "exit 0") + "\n")
            (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))  # nothing else: /bin may be /usr/bin, which has the real ones


UP = {"debug": ("up", [1, 1]), "gpu": ("up", [4])}


def test_a_partition_that_is_up_with_enough_nodes_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_slurm(tmp_path, monkeypatch, partitions=UP)
    check_slurm(slurm_recipe(num_nodes=2))
    check_slurm(slurm_recipe(partition="gpu", num_nodes=4))


@pytest.mark.parametrize(("cluster", "partitions", "message"), [
    ({"partition": "nosuch"}, UP, "cluster.partition='nosuch' is not a partition of this cluster (known: debug, gpu): "
                                  "set one with --set cluster.partition=NAME"),
    ({}, {"debug": ("down", [2])}, "cluster.partition='debug' is not up (sinfo availability: down)"),
    ({"num_nodes": 3}, UP, "cluster.num_nodes=3 but partition 'debug' has 2 nodes: lower cluster.num_nodes to at most 2"),
])
def test_partition_problems_name_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cluster: dict[str, object],
                                         partitions: dict[str, tuple[str, list[int]]], message: str) -> None:
    fake_slurm(tmp_path, monkeypatch, partitions=partitions)
    with pytest.raises(SlurmUnavailable) as raised:
        check_slurm(slurm_recipe(**cluster))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_missing_commands_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_slurm(tmp_path, monkeypatch, partitions=UP, missing=("sbatch", "sacct"))
    with pytest.raises(SlurmUnavailable, match=r"^sbatch, sacct not found on PATH .*add Slurm's bin directory to PATH"):
        check_slurm(slurm_recipe())


def test_a_controller_that_fails_or_hangs_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing = "echo 'slurm_load_partitions: Unable to contact slurm controller (connect failure)' >&2; exit 1"
    fake_slurm(tmp_path, monkeypatch, partitions=UP, sinfo=failing)
    with pytest.raises(SlurmUnavailable, match=r"^`sinfo -h -o %R` failed \(slurm_load_partitions: Unable to contact "
                                               r"slurm controller \(connect failure\)\): .*check `scontrol ping`"):
        check_slurm(slurm_recipe())

    monkeypatch.setattr(checks, "SINFO_TIMEOUT_S", 1.0)
    (tmp_path / "bin" / "sinfo").write_text(f"#!/bin/bash\nexec {SLEEP} 30\n")
    with pytest.raises(SlurmUnavailable, match=r"^`sinfo -h -o %R` did not answer within 1 s: .*SLURM_CONF"):
        check_slurm(slurm_recipe())


def test_check_scheduler_refuses_as_not_runnable_and_skips_local(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fake_slurm(tmp_path, monkeypatch, partitions=UP, missing=checks.SLURM_COMMANDS)
    check_scheduler(load_recipe(str(REPO / LOCAL_RECIPE), base_dir="/b"))  # the local executor asks no Slurm
    with pytest.raises(NotRunnableHere, match="not found on PATH"):
        check_scheduler(slurm_recipe())


def test_the_flow_checks_the_scheduler_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.pipeline import kimi_k25_grpo

    fake_slurm(tmp_path, monkeypatch, partitions=UP)
    with pytest.raises(NotRunnableHere, match="cluster.partition='nosuch' is not a partition"):
        kimi_k25_grpo.fn(recipe=str(REPO / LOCAL_RECIPE), cluster="localhost-slurm", base_dir=str(tmp_path / "base"),
                         overrides=["cluster.partition=nosuch"])
    assert not (tmp_path / "base").exists()


# ----------------------------------------------------------------------------- the CLI on the local cluster
def job_names() -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-o", "JobName%60"], capture_output=True, text=True, check=True).stdout
    return out.split()


@pytest.mark.slurm
@pytest.mark.parametrize(("command", "extra", "no_slurm_on_path", "expected"), [
    ("run", [], True, ["error: sbatch, squeue, sacct, scancel, sinfo not found on PATH",
                       "add Slurm's bin directory to PATH"]),
    ("run", ["--set", "cluster.partition=nosuch"], False,
     ["error: cluster.partition='nosuch' is not a partition of this cluster (known: debug)",
      "--set cluster.partition=NAME"]),
    ("run", ["--set", "cluster.num_nodes=5"], False,
     ["error: cluster.num_nodes=5 but partition 'debug' has 2 nodes", "lower cluster.num_nodes to at most 2"]),
    ("sbatch", ["--set", "cluster.num_nodes=5"], False,
     ["error: cluster.num_nodes=5 but partition 'debug' has 2 nodes", "lower cluster.num_nodes to at most 2"]),
])
def test_bad_input_exits_2_and_submits_nothing(slurm_cluster: dict[str, str], tmp_path: Path, command: str,
                                               extra: list[str], no_slurm_on_path: bool, expected: list[str]) -> None:
    run = f"bad-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if no_slurm_on_path:
        env["PATH"] = str(Path(sys.executable).parent)  # the venv's bin only: no Slurm binaries
    args = [command, LOCAL_RECIPE, "--cluster", "localhost-slurm", "--base-dir", str(tmp_path / "base"),
            "--run-name", run, *extra]
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    shown = f"kimi-grpo {shlex.join(args)}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.returncode == 2, shown
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, shown
    assert all(fragment in proc.stderr for fragment in expected), shown
    # No run dir, script or manifest (`sbatch` may leave the empty base dir its MLflow check resolves).
    assert not (tmp_path / "base" / "runs").exists(), "nothing of the run may be written"
    assert not [name for name in job_names() if name.startswith(run)]
