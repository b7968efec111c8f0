"""The flow with Ray as a Slurm job on the local two-node cluster (real Slurm, Prefect, MLflow, Ray).

What a user relies on: the Ray cluster spans both nodes and the flow talks to it as a Ray Client;
a lost job (scancel) or a job at its deadline is replaced by a new one and the run resumes at
latest + 1 with the same final weights as an uninterrupted run; Ctrl-C, SIGTERM or a SIGKILLed flow
leave no job and no Ray process behind; the token protects the cluster and never leaks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from kimi_core.recipe import load_recipe
from kimi_core.run_state import RunPaths, latest_checkpoint
from kimi_core.runtime.manifest import Manifest
from kimi_core.runtime.ray_slurm import RayFiles
from slurm.errors import SbatchRejected
from slurm.ray_job import RaySlurmJobs, SlurmQueue
from tests.faults import marker_path, release_path
from tests.pipeline.conftest import CLI, REPO, cli_env
from tests.slurm.test_local_cluster import TERMINAL, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster"), pytest.mark.timeout(600)]

def recipe(save_interval: int = 2) -> list[str]:
    """4 rollouts on both test nodes; saves after every `save_interval`-th rollout and the last one
    (the final weights do not depend on when it saves); evals before 0 and after 2."""
    return [
        "configs/local.yaml", "--cluster", "localhost-slurm", "--num-rollout", "4",
        "--set", "cluster.num_nodes=2",
        "--set", "model.warmup.steps=20",
        "--set", "rollout.rollout_batch_size=8",
        "--set", "rollout.n_samples_per_prompt=8",
        "--set", "rollout.global_batch_size=64",
        "--set", f"checkpoint.save_interval={save_interval}",
        "--set", "eval.interval=3",
    ]


RECIPE = recipe()
FINAL = "checkpoints/iter_0000003/model/model.safetensors"
QUEUE = SlurmQueue()


def ray_job_processes(job_id: str) -> set[int]:
    """Pids of processes of Ray job `job_id`: its Ray temp dirs in argv or its id in SLURM_JOB_ID."""
    marker = f"/tmp/ray-{os.getuid()}-{job_id}-"
    found = set()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if marker in " ".join(proc.cmdline()) or proc.environ().get("SLURM_JOB_ID") == job_id:
                found.add(proc.pid)
    return found


def assert_nothing_left(paths: RunPaths, *, within_s: float = 60) -> None:
    """No job of the run in the queue and no process of its Ray jobs, within `within_s`."""
    jobs = Manifest.load(paths).ray_jobs
    assert jobs, "the run recorded no Ray job"
    wait_until(lambda: not any(QUEUE.in_queue(j) for j in jobs), timeout_s=within_s,
               what=f"the run's Ray jobs {jobs} to leave the queue")
    wait_until(lambda: not any(ray_job_processes(j) for j in jobs), timeout_s=within_s,
               what=f"the processes of Ray jobs {jobs} to end")


@contextlib.contextmanager
def cli_running(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[str]]:
    """`kimi-grpo` in a process group of its own, output to `log`; the group is killed if the CLI
    still runs when the block ends (a failed assertion leaves no run behind)."""
    with log.open("w") as handle:
        proc = subprocess.Popen([*CLI, *args], cwd=REPO, env=env, text=True, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for_checkpoint(paths: RunPaths, at_least: int, proc: subprocess.Popen[str], log: Path) -> int:
    def ready() -> int | None:
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        latest = latest_checkpoint(paths) if paths.tracker.is_file() else None
        return latest + 1 if latest is not None and latest >= at_least else None

    return wait_until(ready, timeout_s=400, what=f"checkpoint >= {at_least}") - 1


def current_ray_job(paths: RunPaths, proc: subprocess.Popen[str], log: Path) -> str:
    def running() -> str | None:
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        jobs = Manifest.load(paths).ray_jobs if paths.manifest.is_file() else []
        return jobs[-1] if jobs and QUEUE.state(jobs[-1]) == "RUNNING" else None

    return wait_until(running, timeout_s=400, what="a running Ray job")


def metric_steps(paths: RunPaths, key: str) -> list[int]:
    manifest = Manifest.load(paths)
    client = MlflowClient(manifest.mlflow_tracking_uri)
    return sorted(m.step for m in client.get_metric_history(manifest.mlflow_run_id, key))


def stop_deployed_run(worker: subprocess.Popen[str], flow_run_id: str, paths: RunPaths) -> str:
    """Stop a deployment run that overran: the worker, the flow process (its own process group,
    found by its flow-run id) and the run's Slurm jobs, so the next tests find an idle cluster."""
    os.killpg(worker.pid, signal.SIGKILL)
    output, _ = worker.communicate()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id:
                proc.kill()
    jobs = Manifest.load(paths).all_slurm_job_ids if paths.manifest.is_file() else []
    if jobs:
        subprocess.run(["scancel", *jobs], check=False)
    return output


@pytest.fixture(scope="module")
def reference(prefect_server, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """`prefect deployment run kimi-k25-grpo/local-slurm` through a process worker; its final
    weights are the reference of the tests that interrupt a run."""
    base = tmp_path_factory.mktemp("deployed")
    env = cli_env(prefect_server, KIMI_GRPO_REPO=str(REPO))
    prefect = [str(Path(sys.executable).with_name("prefect"))]

    def prefect_cli(*args: str, timeout: float = 300) -> str:
        proc = subprocess.run([*prefect, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    prefect_cli("work-pool", "create", "kimi-local", "--type", "process", "--overwrite")
    prefect_cli("--no-prompt", "deploy", "--all")
    sets = [a for a in RECIPE[RECIPE.index("--set"):] if a != "--set"]
    out = prefect_cli("deployment", "run", "kimi-k25-grpo/local-slurm", "-p", f"base_dir={base}",
                      "-p", "num_rollout=4", "-p", f"overrides={json.dumps(sets)}", "-p", "run_name=deployed")
    flow_run_id = out.split("/runs/flow-run/")[1].split()[0].strip()
    paths = RunPaths.of(base, "deployed")
    worker_proc = subprocess.Popen([*prefect, "worker", "start", "--pool", "kimi-local", "--run-once"], cwd=REPO,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
    try:
        worker, _ = worker_proc.communicate(timeout=500)
    except subprocess.TimeoutExpired:
        worker = stop_deployed_run(worker_proc, flow_run_id, paths)
        pytest.fail(f"the deployment run did not end within 500 s; worker output:\n{worker[-4000:]}")
    ended = time.monotonic()
    assert worker_proc.returncode == 0, worker[-4000:]
    assert "COMPLETED" in prefect_cli("flow-run", "inspect", flow_run_id).upper().replace("'", "")

    manifest = Manifest.load(paths)
    assert manifest.finished and latest_checkpoint(paths) == 3
    [job] = manifest.ray_jobs
    assert f"Ray job {job} ready" in worker and f"Ray job {job} cancelled (run finished)" in worker
    wait_until(lambda: QUEUE.state(job) in TERMINAL, timeout_s=max(1.0, 60 - (time.monotonic() - ended)),
               what=f"Ray job {job} terminal within 60 s of the flow's end")
    assert QUEUE.node_list(job) == "n[1-2]"
    record = manifest.stages["bring_up_cluster"].result
    assert record["job_id"] == job and record["address"].startswith("ray://")
    placement = manifest.resume_history[-1].placement
    assert placement["slurm_job_id"] == job and placement["slurm_node"] == "n1"
    run = MlflowClient(manifest.mlflow_tracking_uri).get_run(manifest.mlflow_run_id)
    assert run.data.tags["ray_job_id"] == job and job in run.data.tags["slurm_job_ids"].split(",")
    assert metric_steps(paths, "rollout/raw_reward") == [0, 1, 2, 3]
    assert metric_steps(paths, "perf/cluster_bring_up_s") == [0]
    wait_until(lambda: not ray_job_processes(job), timeout_s=max(1.0, 60 - (time.monotonic() - ended)),
               what=f"the processes of Ray job {job} to end within 60 s of the flow's end")
    return (paths.run_dir / FINAL).read_bytes()


def test_scancel_mid_run_brings_up_a_new_job_and_resumes(prefect_server, reference: bytes, tmp_path: Path) -> None:
    paths = RunPaths.of(tmp_path, "lost")
    log = tmp_path / "cli.log"
    args = ["run", *RECIPE, "--run-name", "lost", "--base-dir", str(tmp_path)]
    with cli_running(args, cli_env(prefect_server), log) as proc:
        wait_for_checkpoint(paths, 1, proc, log)
        lost = Manifest.load(paths).ray_jobs[-1]
        cancelled_at = time.monotonic()
        subprocess.run(["scancel", lost], check=True)
        wait_until(lambda: not QUEUE.in_queue(lost), timeout_s=60, what=f"job {lost} to leave the queue")
        saved = latest_checkpoint(paths)

        def resumed() -> bool:  # the first rollout line after the new session opened
            text = log.read_text()
            opened = text.find("engine session opened", text.find(f"Ray job {lost} ended"))
            return opened >= 0 and "rollout " in text[text.find("\n", opened):] or proc.poll() is not None

        wait_until(resumed, timeout_s=400, what="the first rollout of the new Ray job")
        print(f"scancel -> first rollout of the new Ray job: {time.monotonic() - cancelled_at:.1f} s")
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    out = log.read_text()
    manifest = Manifest.load(paths)
    assert len(manifest.ray_jobs) == 2 and manifest.ray_jobs[0] == lost, manifest.ray_jobs
    new = manifest.ray_jobs[1]
    assert f"Ray job {lost} ended" in out and f"Ray job {new} ready" in out, out[-3000:]
    assert saved is not None and manifest.resume_history[-1].start_rollout_id == saved + 1
    assert (paths.run_dir / FINAL).read_bytes() == reference
    assert metric_steps(paths, "rollout/raw_reward") == [0, 1, 2, 3]  # nothing logged twice
    runs = MlflowClient(manifest.mlflow_tracking_uri).search_runs(
        [r.info.experiment_id for r in [MlflowClient(manifest.mlflow_tracking_uri).get_run(manifest.mlflow_run_id)]])
    assert [r.info.run_id for r in runs] == [manifest.mlflow_run_id]
    assert_nothing_left(paths)


def test_deadline_saves_at_the_next_boundary_and_moves_to_a_new_job(prefect_server, reference: bytes,
                                                                    tmp_path: Path) -> None:
    """Only the last rollout is saved on schedule here. The engine is held in the middle of rollout 1
    while the Ray job gets its deadline signal (`scancel --signal=USR1 --batch`); rollout 2 is then
    saved although the schedule does not save it, and a new job goes on at 3 (nothing redone)."""
    paths = RunPaths.of(tmp_path, "deadline")
    log = tmp_path / "cli.log"
    env = cli_env(prefect_server, KIMI_GRPO_FAULT_HOOK="tests.faults:at_train", KIMI_TEST_FAULT_AT_TRAIN="1",
                  KIMI_TEST_FAULT_MODE="hold")
    held = marker_path(paths.run_dir, "train.mid", 1)
    args = ["run", *recipe(save_interval=10), "--run-name", "deadline", "--base-dir", str(tmp_path)]
    with cli_running(args, env, log) as proc:
        wait_until(lambda: held.exists() or proc.poll() is not None, timeout_s=400, what="rollout 1 to be held")
        first = Manifest.load(paths).ray_jobs[-1]
        subprocess.run(["scancel", "--signal=USR1", "--batch", first], check=True)
        wait_until(lambda: RayFiles.of(paths.run_dir).deadline(first).exists(), timeout_s=60,
                   what="the batch shell's deadline mark")
        release_path(held).touch()
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    out = log.read_text()
    manifest = Manifest.load(paths)
    assert len(manifest.ray_jobs) == 2 and manifest.ray_jobs[0] == first, out[-3000:]
    assert "near its time limit" in out
    assert not (paths.checkpoints / "iter_0000001").exists()  # held rollout 1 was not saved ...
    assert manifest.resume_history[-1].start_rollout_id == 3  # ... rollout 2 was, at the boundary after the mark
    assert (paths.run_dir / FINAL).read_bytes() == reference
    assert metric_steps(paths, "rollout/raw_reward") == [0, 1, 2, 3]
    assert not manifest.failures, manifest.failures  # a roll-over is not a failure
    assert_nothing_left(paths)


def test_ctrl_c_during_bring_up_and_sigterm_during_rollouts_leave_nothing(prefect_server, tmp_path: Path) -> None:
    paths = RunPaths.of(tmp_path, "stopped")
    args = ["run", *RECIPE, "--run-name", "stopped", "--base-dir", str(tmp_path)]
    log = tmp_path / "sigint.log"
    with cli_running(args, cli_env(prefect_server), log) as proc:
        wait_until(lambda: "submitted" in log.read_text() or proc.poll() is not None, timeout_s=400,
                   what="the Ray job's submission")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
        stopped = time.monotonic()
        assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
        assert time.monotonic() - stopped < 60
    assert_nothing_left(paths)

    log = tmp_path / "sigterm.log"
    with cli_running(args, cli_env(prefect_server), log) as proc:
        wait_for_checkpoint(paths, 1, proc, log)
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert proc.wait(timeout=60) == 143, log.read_text()[-3000:]
        assert time.monotonic() - stopped < 60
    manifest = Manifest.load(paths)
    assert MlflowClient(manifest.mlflow_tracking_uri).get_run(manifest.mlflow_run_id).info.status == "KILLED"
    assert_nothing_left(paths)


def test_sigkilled_flow_job_ends_by_lease_and_the_token_guards_the_cluster(prefect_server, tmp_path: Path) -> None:
    lease_s = 45
    paths = RunPaths.of(tmp_path, "orphan")
    log = tmp_path / "cli.log"
    args = ["run", *RECIPE, "--run-name", "orphan", "--base-dir", str(tmp_path), "--set", f"cluster.ray.lease_s={lease_s}"]
    with cli_running(args, cli_env(prefect_server), log) as proc:
        job = current_ray_job(paths, proc, log)
        files = RayFiles.of(paths.run_dir)
        ready = json.loads(wait_until(lambda: files.ready(job).is_file() and files.ready(job).read_text(),
                                      timeout_s=300, what="the readiness file"))
        os.killpg(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=30)
    assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(files.token.stat().st_mode) == 0o600
    # A Ray Client without the token is refused (Ray closes the connection; the client gives up).
    probe = ("import ray, sys\n"
             "try:\n    ray.init(sys.argv[1])\nexcept ConnectionError as exc:\n    print('refused', exc)\n"
             "else:\n    print('connected')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run([sys.executable, "-c", probe, ready["address"]], capture_output=True, text=True,
                             timeout=120, env={**env, "RAY_AUTH_MODE": "disabled"})
    assert "refused" in refused.stdout, refused.stdout + refused.stderr[-2000:]
    wait_until(lambda: QUEUE.state(job) in TERMINAL, timeout_s=lease_s + 60 - (time.monotonic() - killed),
               what=f"Ray job {job} to end by itself (lease {lease_s} s)")
    assert_nothing_left(paths)
    token = files.token.read_text().strip()
    assert len(token) >= 32
    leaks = [p for p in paths.run_dir.rglob("*") if p.is_file() and p != files.token
             and token.encode() in p.read_bytes()]
    assert not leaks, f"the token appears in {leaks}"
    assert token not in log.read_text()


def test_a_ray_job_sbatch_refuses_is_a_permanent_error(tmp_path: Path) -> None:
    """Past the preflight (e.g. the partition went away meanwhile), sbatch's refusal is not retried."""
    recipe = load_recipe(REPO / "configs/local.yaml", cluster="localhost-slurm", base_dir=str(tmp_path),
                         overrides=["cluster.num_nodes=2", "cluster.partition=nosuch"])
    run_dir = RunPaths.of(tmp_path, "refused").run_dir
    jobs = RaySlurmJobs.for_run(recipe, run_name="refused", run_dir=run_dir,
                                deadline_mark_prefix=RayFiles.of(run_dir).deadline_prefix)
    with pytest.raises(SbatchRejected, match="(?i)partition"):
        jobs.submit(print, "never runs")
