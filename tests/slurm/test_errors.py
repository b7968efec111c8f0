"""A failed sbatch is classified from its stderr: a rejected job is permanent, a busy controller transient.

The stderr texts are real: captured from the local cluster (`sbatch -p nosuch`, `--gres=gpu:99`, a
slurm.conf naming a port no controller listens on) or, for account and QOS (the test cluster does
not enforce associations), Slurm 22.05's own messages (libslurmfull). No Slurm is needed here: a
fake `sbatch` on PATH prints them.
"""

from __future__ import annotations

import operator
import shlex
from pathlib import Path

import pytest
import submitit

from kimi_core.recipe import load_recipe
from kimi_core.runtime.failures import is_transient
from slurm.errors import SbatchRejected, SchedulerBusy, classify_sbatch_error, sbatch_error_line
from slurm.executors import sbatch_script
from slurm.launcher import StageLauncher

REPO = Path(__file__).resolve().parents[2]

INVALID_PARTITION = ("sbatch: error: invalid partition specified: nosuch\n"
                     "sbatch: error: Batch job submission failed: Invalid partition name specified\n")
NODE_CONFIG = "sbatch: error: Batch job submission failed: Requested node configuration is not available\n"
INVALID_ACCOUNT = ("sbatch: error: Batch job submission failed: Invalid account or account/partition "
                   "combination specified\n")
INVALID_QOS = "sbatch: error: Batch job submission failed: Invalid qos specification\n"
NO_CONTROLLER = "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)\n"
SOCKET_TIMEOUT = "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation\n"
TEMPORARILY_UNABLE = ("sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying\n"
                      "sbatch: error: Batch job submission failed: Resource temporarily unavailable\n")


@pytest.mark.parametrize(("stderr", "expected", "line", "fix"), [
    (INVALID_PARTITION, SbatchRejected, "Batch job submission failed: Invalid partition name specified",
     "cluster.partition"),
    (NODE_CONFIG, SbatchRejected, "Batch job submission failed: Requested node configuration is not available",
     "cluster.num_nodes"),
    (INVALID_ACCOUNT, SbatchRejected, "Batch job submission failed: Invalid account or account/partition "
     "combination specified", "cluster.account"),
    (INVALID_QOS, SbatchRejected, "Batch job submission failed: Invalid qos specification", "cluster.qos"),
    (NO_CONTROLLER, SchedulerBusy, "Batch job submission failed: Unable to contact slurm controller "
     "(connect failure)", "retry later"),
    (SOCKET_TIMEOUT, SchedulerBusy, "Batch job submission failed: Socket timed out on send/recv operation",
     "retry later"),
    (TEMPORARILY_UNABLE, SchedulerBusy, "Batch job submission failed: Resource temporarily unavailable",
     "retry later"),
])
def test_sbatch_stderr_is_classified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stderr: str,
                                     expected: type[Exception], line: str, fix: str) -> None:
    assert classify_sbatch_error(stderr) is expected
    assert sbatch_error_line(stderr) == line
    fake_sbatch(tmp_path, monkeypatch, stderr)
    with pytest.raises(expected) as raised:
        sbatch_script(tmp_path / "job.sbatch", cwd=tmp_path)
    message = str(raised.value)
    assert "\n" not in message and line in message and fix in message
    assert is_transient(raised.value) is (expected is SchedulerBusy)


def test_unknown_sbatch_errors_are_permanent() -> None:
    assert classify_sbatch_error("sbatch: error: something new\n") is SbatchRejected
    assert sbatch_error_line("sbatch: error: something new\n") == "something new"
    assert sbatch_error_line("") == "(no message)"


def test_submitit_submission_is_classified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit raises FailedJobError(stderr) for a failed sbatch; the launcher re-raises it classified."""
    fake_sbatch(tmp_path, monkeypatch, INVALID_PARTITION)
    recipe = load_recipe(str(REPO / "configs/local.yaml"), cluster="localhost-slurm", base_dir=str(tmp_path))
    launcher = StageLauncher(recipe=recipe, run_name="r", logs=tmp_path / "logs")
    with pytest.raises(SbatchRejected, match="Invalid partition name specified: check cluster.partition") as raised:
        launcher.launch("prepare_data", operator.add, 1, 2, reattach_to=None)
    assert isinstance(raised.value.__cause__, submitit.core.utils.FailedJobError)

    fake_sbatch(tmp_path, monkeypatch, NO_CONTROLLER)
    with pytest.raises(SchedulerBusy, match="Unable to contact slurm controller") as busy:
        launcher.launch("prepare_data", operator.add, 1, 2, reattach_to=None)
    assert is_transient(busy.value)


def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stderr: str) -> None:
    """An `sbatch` first on PATH that prints `stderr` and fails, as sbatch does on a refused job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "stderr.txt").write_text(stderr)
    script = bin_dir / "sbatch"
    script.write_text(f"#!/bin/sh\ncat {shlex.quote(str(tmp_path / 'stderr.txt'))} >&2\nexit 1\n")
    script.chmod(0o755)
    (tmp_path / "job.sbatch").write_text("#!/bin/bash\ntrue\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
