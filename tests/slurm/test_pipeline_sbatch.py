"""The pipeline sbatch job: golden scripts, the CLI, and runs on the local Slurm cluster.

The `slurm`-marked tests need tests/slurm/start-local-slurm.sh; without it they skip.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from flows.cli import SBATCH_FILENAME, main
from kimi_core.exit_codes import REQUEUE_EXIT
from kimi_core.recipe import BASE_DIR_ENV, load_recipe, plan_run
from kimi_core.run_state import RunPaths, latest_checkpoint
from kimi_core.runtime.manifest import Manifest
from slurm.executors import cancel_jobs, sbatch_script, slurm_job_state
from slurm.from_recipe import training_job_request
from slurm.render import render_pipeline_sbatch
from slurm.requests import SlurmJobRequest
from tests.slurm.test_local_cluster import TERMINAL, wait_until
from tests.slurm.test_render import GOLDEN_DIR, assert_matches_golden

REPO = Path(__file__).resolve().parents[2]
LOCAL_RECIPE = "configs/local.yaml"
GOLDEN = {
    "kimi-k25-grpo_h200_32n.sbatch": ("configs/kimi-k25-grpo.yaml", "h200"),
    "kimi-k25-grpo_local.sbatch": (LOCAL_RECIPE, "localhost-slurm"),
}
# The local recipe made small: one optimizer step of 16 samples per rollout, a 16-prompt eval.
SMALL = [
    "model.warmup.steps=10", "model.warmup.batch_size=8", "rollout.rollout_batch_size=4",
    "rollout.n_samples_per_prompt=4", "rollout.global_batch_size=16", "eval.n_samples_per_prompt=1",
    'eval.datasets=[{name: arith, path: "synthetic://arith?seed=0&n=16&split=eval&max_operand=99&op=max"}]',
]


@pytest.fixture()
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from the repo root (profiles resolve from configs/) with no base dir in the environment."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv(BASE_DIR_ENV, raising=False)


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def set_args(overrides: list[str]) -> list[str]:
    return [arg for assignment in overrides for arg in ("--set", assignment)]


# ----------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_pipeline_sbatch_golden(name: str, in_repo: None, capsys: pytest.CaptureFixture[str]) -> None:
    recipe_path, profile = GOLDEN[name]
    # The local profile's default interpreter is this process's: pinned to python3 for the golden file.
    python = ["--python", "python3"]
    code, rendered, _ = cli(["render", recipe_path, "--cluster", profile, "--what", "sbatch", *python], capsys)
    assert code == 0
    assert_matches_golden(rendered, name)
    code, dry_run, _ = cli(["sbatch", recipe_path, "--cluster", profile, "--dry-run", *python], capsys)
    assert (code, dry_run) == (0, rendered)


@pytest.mark.parametrize(("extra", "python"), [
    ([], sys.executable),  # the interpreter running kimi-grpo: the job imports what it has installed
    (["--set", "cluster.container_image=miles:test"], "python3"),  # the container's own
    (["--python", "/opt/py/bin/python"], "/opt/py/bin/python"),
])
def test_sbatch_job_interpreter(in_repo: None, capsys: pytest.CaptureFixture[str], extra: list[str],
                                python: str) -> None:
    code, script, err = cli(["sbatch", LOCAL_RECIPE, "--cluster", "localhost-slurm", "--dry-run", *extra], capsys)
    assert code == 0, err
    assert f"PYTHON={shlex.quote(python)}" in script.splitlines()
    code, ray_up, err = cli(["render", LOCAL_RECIPE, "--cluster", "localhost-slurm", "--what", "ray-up", *extra],
                            capsys)
    assert code == 0, err
    assert f"--kill-on-bad-exit=1 {shlex.quote(python)} -u -m submitit.core._submit " in ray_up  # every Ray node


def test_num_rollout_reaches_the_driver(in_repo: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, script, err = cli(["sbatch", LOCAL_RECIPE, "--cluster", "localhost-slurm", "--dry-run",
                             "--num-rollout", "7"], capsys)
    assert code == 0, err
    line = next(line for line in script.splitlines() if line.startswith("DRIVER_ARGS=("))
    assert line.endswith(" --cluster localhost-slurm --num-rollout 7)")


def test_h200_script_carries_the_recipe_and_profile() -> None:
    script = (GOLDEN_DIR / "kimi-k25-grpo_h200_32n.sbatch").read_text()
    for line in ["#SBATCH --nodes=32", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=96",
                 "#SBATCH --partition=h200", "#SBATCH --time=48:00:00", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@900", "#SBATCH --open-mode=append",
                 "#SBATCH --output=/shared/kimi-k25/runs/kimi-k25-grpo/slurm/%x-%j.out",
                 "export OPEN_TRAINING_INT4_FAKE_QAT_FLAG=1", "export KIMI_GRPO_BASE_DIR=/shared/kimi-k25",
                 "DRIVER_ARGS=(configs/kimi-k25-grpo.yaml --run-name kimi-k25-grpo --base-dir "
                 "/shared/kimi-k25 --cluster h200)"]:
        assert line in script.splitlines(), line
    assert 'srun --nodes=1 --ntasks=1 --container-image=miles:kimi-k25 "$PYTHON"' in script
    assert "# NOTE: the Megatron + SGLang engine this GPU recipe needs is not implemented yet: the data and" in script
    local = (GOLDEN_DIR / "kimi-k25-grpo_local.sbatch").read_text()
    assert "NOTE" not in local and "srun" not in local


def test_requeue_exit_matches_the_driver() -> None:
    """The script requeues on `kimi_core.exit_codes.REQUEUE_EXIT`, the status the driver exits with."""
    script = render_pipeline_sbatch(local_request(), recipe_path="r.yaml", run_name="r", base_dir="b",
                                    cluster_profile=None, overrides=[])
    assert f"REQUEUE_EXIT={REQUEUE_EXIT}" in script.splitlines()
    assert "((rc == REQUEUE_EXIT))" in script


def local_request(**fields: object) -> SlurmJobRequest:
    return SlurmJobRequest(**{"job_name": "x", "nodes": 1, "gpus_per_node": 0, "cpus_per_task": 1,
                              "partition": "debug", "time_limit": "00:10:00", "output_dir": "o",
                              "requeue": True, **fields})


def test_driver_arguments_survive_the_shell(tmp_path: Path) -> None:
    overrides = ["eval.datasets=[{name: a b, path: \"x?y=1&z=$HOME\"}]", "env.NOTE='it''s'", "rollout.seed=3"]
    script = render_pipeline_sbatch(local_request(), recipe_path="my recipes/r.yaml", run_name="r1",
                                    base_dir="/data/base dir", cluster_profile="p", overrides=overrides)
    line = next(line for line in script.splitlines() if line.startswith("DRIVER_ARGS=("))
    shown = subprocess.run(["bash", "-c", f'{line}\nprintf "%s\\0" "${{DRIVER_ARGS[@]}}"'],
                           capture_output=True, text=True, check=True).stdout
    assert shown.split("\0")[:-1] == ["my recipes/r.yaml", "--run-name", "r1", "--base-dir", "/data/base dir",
                                      "--cluster", "p", "--set", overrides[0], "--set", overrides[1],
                                      "--set", overrides[2]]
    assert "export KIMI_GRPO_BASE_DIR='/data/base dir'" in script


FAKE_TOPO = {  # fakes of `nvidia-smi topo -m` output (no GPU here)
    "nvlink": "\tGPU0\tGPU1\tCPU Affinity\nGPU0\t X \tNV18\t0-55\nGPU1\tNV18\t X \t0-55\n\nLegend:\n  NV#  = bonded NVLinks\n",
    "pcie": "\tGPU0\tGPU1\tCPU Affinity\nGPU0\t X \tSYS\t0-55\nGPU1\tSYS\t X \t0-55\n\nLegend:\n  NV#  = bonded NVLinks\n",
}


@pytest.mark.parametrize(("topo", "preset", "expected"), [
    ("nvlink", None, "1"), ("pcie", None, "0"), (None, None, "0"), ("nvlink", "0", "0"),
])
def test_nvls_gate(tmp_path: Path, topo: str | None, preset: str | None, expected: str) -> None:
    lines = render_pipeline_sbatch(local_request(), recipe_path="r.yaml", run_name="r", base_dir="b",
                                   cluster_profile=None, overrides=[]).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("NVLINK_REFS="))
    gate = "\n".join(lines[start:start + 3])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if topo is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\nprintf '%s' {shlex.quote(FAKE_TOPO[topo])}\n")
        fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", **({"NCCL_NVLS_ENABLE": preset} if preset else {})}
    out = subprocess.run(["bash", "-c", f"set -uo pipefail\n{gate}\necho $NCCL_NVLS_ENABLE"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == expected


def test_pipeline_job_needs_requeue() -> None:
    with pytest.raises(ValueError, match="requeue=True"):
        render_pipeline_sbatch(local_request(requeue=False), recipe_path="r.yaml", run_name="r", base_dir="b",
                               cluster_profile=None, overrides=[])


# ----------------------------------------------------------------------------- CLI errors
def test_sbatch_without_slurm_profile_exits_2(in_repo: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["sbatch", LOCAL_RECIPE, "--dry-run"], capsys)
    assert code == 2 and out == ""
    assert "cluster.executor is 'local'" in err and "--cluster NAME" in err
    code, _, err = cli(["render", LOCAL_RECIPE, "--cluster", "local", "--what", "sbatch"], capsys)
    assert code == 2 and "Slurm cluster profile" in err


def test_sbatch_without_base_dir_exits_2(in_repo: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["sbatch", "configs/kimi-k25-2layer-smoke.yaml", "--cluster", "localhost-slurm", "--dry-run"],
                       capsys)
    assert code == 2 and "cluster.base_dir is not set" in err


def test_conversion_is_not_a_render_choice(in_repo: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["render", LOCAL_RECIPE, "--what", "conversion"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'conversion'" in capsys.readouterr().err


def test_render_ray_up_prints_the_flows_ray_job(in_repo: None, capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    code, script, _ = cli(["render", "configs/kimi-k25-grpo.yaml", "--cluster", "h200", "--what", "ray-up"], capsys)
    assert code == 0
    assert "#SBATCH --nodes=32" in script and "#SBATCH --job-name=kimi-k25-grpo-ray" in script
    assert "--container-image=miles:kimi-k25 --kill-on-bad-exit=1 python3 -u -m submitit.core._submit " \
           "/shared/kimi-k25/runs/kimi-k25-grpo/slurm" in script
    (tmp_path / "ray_up.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "ray_up.sbatch")]).returncode == 0


# ----------------------------------------------------------------------------- local Slurm cluster
@pytest.fixture(scope="module")
def shared_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One base dir for the cluster runs: the second reuses the base model the first built."""
    return tmp_path_factory.mktemp("pipeline-base")


class RolloutLog:
    """`rollout/raw_reward` steps of a run as MLflow has them (None until the run is tracked)."""

    def __init__(self, paths: RunPaths):
        self.paths = paths
        self.client = None

    def steps(self) -> list[int] | None:
        from mlflow.tracking import MlflowClient

        try:
            manifest = Manifest.load(self.paths)
            if manifest.mlflow_run_id is None:
                return None
            if self.client is None:
                self.client = MlflowClient(tracking_uri=manifest.mlflow_tracking_uri)
            history = self.client.get_metric_history(manifest.mlflow_run_id, "rollout/raw_reward")
        except Exception:
            return None
        return sorted(metric.step for metric in history)


def job_processes(job_id: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SLURM_JOB_ID") == job_id:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def finish(job_id: str, *, timeout_s: float) -> str:
    """Wait for a terminal state (cancel the job if the wait fails) and for its processes to go."""
    try:
        return wait_until(lambda: (s := slurm_job_state(job_id)) in TERMINAL and s, timeout_s=timeout_s,
                          what=f"job {job_id} to finish")
    finally:
        if slurm_job_state(job_id) not in TERMINAL:
            cancel_jobs([job_id])
        wait_until(lambda: not job_processes(job_id), timeout_s=60, what=f"no processes of job {job_id} left")


def log_tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else f"(no log {path})"


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_sbatch_runs_the_local_recipe_to_completion(
    slurm_cluster: dict[str, str], shared_base: Path, in_repo: None, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    run = f"complete-{uuid.uuid4().hex[:6]}"
    overrides = [*SMALL, "checkpoint.save_interval=2", "eval.interval=3"]
    # No --python: the job runs the interpreter running kimi-grpo (here the test's, with the project installed).
    code, out, err = cli(["sbatch", LOCAL_RECIPE, "--cluster", "localhost-slurm", "--base-dir", str(shared_base),
                          "--run-name", run, "--num-rollout", "6", *set_args(overrides)], capsys)
    assert code == 0, err
    job_id = re.search(r"submitted job (\d+)", out).group(1)  # type: ignore[union-attr]
    paths = RunPaths.of(shared_base, run)
    script = (paths.run_dir / "slurm" / SBATCH_FILENAME).read_text().splitlines()
    assert f"PYTHON={shlex.quote(sys.executable)}" in script
    log = paths.run_dir / "slurm" / f"{run}-{job_id}.out"
    state = finish(job_id, timeout_s=200)
    assert state == "COMPLETED", log_tail(log)

    manifest = Manifest.load(paths)
    assert manifest.finished
    assert latest_checkpoint(paths) == 5  # saves after 1, 3 and the last rollout 5
    assert [(a.start_rollout_id, a.slurm_job_ids) for a in manifest.resume_history] == [(0, [job_id])]
    assert RolloutLog(paths).steps() == [0, 1, 2, 3, 4, 5]  # one raw-reward point per rollout


def requeue_count(job_id: str) -> tuple[int, str]:
    """(Restarts, JobState) from `scontrol show job`."""
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    restarts = re.search(r"\bRestarts=(\d+)", text)
    state = re.search(r"\bJobState=(\S+)", text)
    return (int(restarts.group(1)) if restarts else 0), (state.group(1) if state else "UNKNOWN")


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_deadline_signal_saves_requeues_and_resumes(slurm_cluster: dict[str, str], shared_base: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    monkeypatch.delenv(BASE_DIR_ENV, raising=False)
    run, save_interval, num_rollout = f"preempt-{uuid.uuid4().hex[:6]}", 5, 16
    overrides = [*SMALL, f"rollout.num_rollout={num_rollout}", f"checkpoint.save_interval={save_interval}",
                 "eval.interval=5"]
    recipe_path = str(REPO / LOCAL_RECIPE)
    recipe = load_recipe(recipe_path, overrides=overrides, cluster="localhost-slurm", base_dir=str(shared_base))
    paths = RunPaths.of(shared_base, run)
    slurm_dir = paths.run_dir / "slurm"
    slurm_dir.mkdir(parents=True)
    req = training_job_request(recipe, name=run, output_dir=slurm_dir)
    script = slurm_dir / "pipeline.sbatch"
    script.write_text(render_pipeline_sbatch(
        req, recipe_path=recipe_path, run_name=run, base_dir=str(shared_base), cluster_profile="localhost-slurm",
        overrides=overrides, python=sys.executable, workdir=str(REPO)))
    job_id = sbatch_script(script, cwd=slurm_dir)
    log, rollouts = slurm_dir / f"{run}-{job_id}.out", RolloutLog(paths)
    try:
        seen = wait_until(lambda: (s := rollouts.steps()) and max(s) >= 6 and s, timeout_s=150,
                          what="rollout 6 in MLflow")
        last_seen = max(seen)
        # What the deadline signal (--signal=B:USR1@N) does: SIGUSR1 to the batch shell only.
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        # Slurm holds a requeued job back for the credential lifetime (cred_expire, 10 s on the test
        # cluster): forcing an earlier start gets the job killed with "Job credential revoked".
        wait_until(lambda: requeue_count(job_id)[0] >= 1, timeout_s=90, what=f"job {job_id} requeued")
    finally:
        state = finish(job_id, timeout_s=200)
    assert state == "COMPLETED", log_tail(log)

    records = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-o", "State", "-j", job_id],
                             capture_output=True, text=True, check=True).stdout.split()
    assert records[0] == "REQUEUED" and records[-1] == "COMPLETED", records
    text = log.read_text()  # both attempts (--open-mode=append)
    assert "SIGUSR1: asking the driver" in text and f"requeueing job {job_id}" in text
    saved = int(re.search(r"saved rollout (\d+); exiting for requeue", text).group(1))  # type: ignore[union-attr]
    assert (paths.checkpoints / f"iter_{saved:07d}").is_dir()
    # The save came at the first boundary after the signal, no later than the next scheduled save.
    # Rollout `last_seen` had started before the signal; it is the one kept only when its own save was
    # scheduled (a signal between that save and the next rollout leaves nothing unsaved, so no rollout runs).
    assert last_seen <= saved <= last_seen + save_interval
    assert saved > last_seen or plan_run(recipe).is_save_due(saved), (last_seen, saved)

    manifest = Manifest.load(paths)
    assert manifest.finished and latest_checkpoint(paths) == num_rollout - 1
    assert len(manifest.resume_history) >= 2
    first, second = manifest.resume_history[:2]
    assert (first.start_rollout_id, first.slurm_job_ids) == (0, [job_id])
    assert (second.start_rollout_id, second.slurm_job_ids) == (saved + 1, [job_id])
    # Nothing trained before the signal was trained again (at most a save interval may be redone).
    assert second.start_rollout_id > last_seen
    assert rollouts.steps() == list(range(num_rollout))
