"""The local pipeline end to end: real Prefect server, real MLflow server, real Ray, real files.

Asserts what a user relies on: one MLflow run per run name with one metric point per rollout and
eval points at the due rollouts only; re-running a complete run does no work; a run killed at any
point (or whose engine dies during a save) continues at latest + 1 and ends with weights
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from kimi_core.run_state import RunPaths, latest_checkpoint
from kimi_core.runtime.manifest import Manifest
from kimi_core.runtime.ray_local import RayHead, stop_local_ray_head
from tests.pipeline.conftest import CLI, REPO, SMALL, cli_env, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
FINAL = "checkpoints/iter_0000005/model/model.safetensors"
#: The engine process dies (or, with KIMI_TEST_FAULT_MODE=pause, waits) halfway through writing checkpoint 3.
FAULT_AT_SAVE_3 = {"KIMI_GRPO_FAULT_HOOK": "tests.faults:at_save", "KIMI_TEST_FAULT_AT_SAVE": "3"}


@pytest.fixture(scope="module")
def reference_final(prefect_server, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The final policy safetensors of an uninterrupted run of the small recipe."""
    base = tmp_path_factory.mktemp("reference")
    proc = run_cli(["run", "configs/local.yaml", "--run-name", "reference", "--base-dir", str(base), *SMALL],
                   cli_env(prefect_server))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (RunPaths.of(base, "reference").run_dir / FINAL).read_bytes()


def _kill_machine(proc: subprocess.Popen[str], paths: RunPaths) -> None:
    """SIGKILL everything the run started: the CLI's process group and the Ray head's processes
    (with the engine actor), as a lost machine would."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    record = Manifest.load(paths).stages.get("bring_up_cluster")
    if record is None or not record.result:
        return
    head = RayHead(**record.result["head"])
    victims = [psutil.Process(pid) for pid in _head_pids(head)]
    for victim in victims:
        with contextlib.suppress(psutil.Error):
            victim.kill()
    psutil.wait_procs(victims, timeout=30)


def _head_pids(head: RayHead) -> set[int]:
    pids: set[int] = set()
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == head.pid:
                pids.add(proc.pid)
                pids.update(child.pid for child in proc.children(recursive=True))
    return pids


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _stop_leftover_head(paths: RunPaths) -> None:
    """A killed CLI leaves its Ray head running (it has its own session): stop it by pid."""
    record = Manifest.load(paths).stages.get("bring_up_cluster")
    if record is not None and record.status == "completed" and record.result:
        stop_local_ray_head(RayHead(**record.result["head"]))


def _ray_temp_dirs() -> set[Path]:
    """The loopback heads' temp dirs on this machine (`ray_local.short_temp_dir`)."""
    return set(Path("/tmp").glob("kr-*"))


def test_run_logs_to_mlflow_server_and_rerun_does_no_work(prefect_server, mlflow_server, base_dir: Path) -> None:
    env = cli_env(prefect_server, MLFLOW_TRACKING_URI=mlflow_server)
    temp_dirs = _ray_temp_dirs()
    proc = run_cli(["run", "configs/local.yaml", "--run-name", "tracked", "--base-dir", str(base_dir), *SMALL], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not _ray_temp_dirs() - temp_dirs  # a clean end removes its Ray head's temp dir
    assert "rollout 6/6" in proc.stderr and "ETA" in proc.stderr  # live progress lines

    paths = RunPaths.of(base_dir, "tracked")
    manifest = Manifest.load(paths)
    assert manifest.finished and latest_checkpoint(paths) == 5
    assert manifest.mlflow_tracking_uri == mlflow_server
    client = MlflowClient(mlflow_server)
    run = client.get_run(manifest.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.tags["rollout.num_rollout"] == "6" and "rollout.num_rollout" not in run.data.params
    assert run.data.params["grpo.eps_clip_high"] == "0.28"
    assert run.data.tags["engine"] == "local" and run.data.tags["resume_count"] == "0"
    assert _steps(client, run.info.run_id, "rollout/raw_reward") == [0, 1, 2, 3, 4, 5]
    assert _steps(client, run.info.run_id, "train/pg_loss") == [0, 1, 2, 3, 4, 5]
    assert _steps(client, run.info.run_id, "perf/step_time") == [0, 1, 2, 3, 4, 5]  # the orchestrator's timing
    assert _steps(client, run.info.run_id, "eval/arith") == [0, 2, 5]  # before training, then after 2 and 5
    assert _steps(client, run.info.run_id, "eval/arith/pass_at_4") == [0, 2, 5]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "plots", "eval", "checkpoints"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/reward.png", "plots/eval.png"}
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert tables == {f"eval/samples_rollout_{i:07d}.json" for i in (0, 2, 5)}
    assert run.data.tags["checkpoint.latest_rollout_id"] == "5"

    before = paths.manifest.stat().st_mtime_ns
    again = run_cli(["run", "configs/local.yaml", "--run-name", "tracked", "--base-dir", str(base_dir), *SMALL], env)
    assert again.returncode == 0
    assert "already complete" in again.stdout
    assert paths.manifest.stat().st_mtime_ns == before  # nothing recorded: no stage, no attempt
    assert _steps(client, run.info.run_id, "rollout/raw_reward") == [0, 1, 2, 3, 4, 5]


def _wait_for_latest(paths: RunPaths, at_least: int, proc: subprocess.Popen[str], timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        if paths.tracker.is_file() and (latest := latest_checkpoint(paths)) is not None and latest >= at_least:
            return latest
        time.sleep(0.1)
    raise TimeoutError(f"no checkpoint >= {at_least} within {timeout} s")


def test_kill_and_resume_is_bitwise_identical(prefect_server, reference_final: bytes, base_dir: Path) -> None:
    env = cli_env(prefect_server)

    paths = RunPaths.of(base_dir, "killed")
    args = ["run", "configs/local.yaml", "--run-name", "killed", "--base-dir", str(base_dir), *SMALL]
    proc = subprocess.Popen([*CLI, *args], cwd=REPO, env=env, text=True, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_latest(paths, 1, proc)
        time.sleep(random.Random(os.getpid()).uniform(0.0, 2.0))  # a random point of rollouts 2-3
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        killed_at = latest_checkpoint(paths)
        run_id = Manifest.load(paths).mlflow_run_id
        stage_jobs = sorted((paths.logs / "jobs").rglob("*_submitted.pkl"))

        resumed = run_cli(args, env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    finally:
        _stop_leftover_head(paths)
    assert len(stage_jobs) == 3  # the first run's prepare_data, acquire_model, convert_checkpoint
    # the resume found every stage's output current itself, and started no stage job
    assert sorted((paths.logs / "jobs").rglob("*_submitted.pkl")) == stage_jobs
    said = resumed.stdout + resumed.stderr
    assert said.count("inputs unchanged, earlier output reused") == 3, said[-3000:]
    manifest = Manifest.load(paths)
    assert manifest.mlflow_run_id == run_id  # the same MLflow run, reopened
    assert len(manifest.resume_history) == 2
    restart = manifest.resume_history[1].start_rollout_id
    assert restart is not None and restart - 1 >= killed_at
    assert (paths.checkpoints / f"iter_{restart - 1:07d}").is_dir()  # continued at latest + 1
    client = MlflowClient(manifest.mlflow_tracking_uri)
    assert _steps(client, run_id, "rollout/raw_reward") == [0, 1, 2, 3, 4, 5]  # no rollout logged twice
    assert client.get_run(run_id).data.tags["resume_count"] == "1"
    assert (paths.run_dir / FINAL).read_bytes() == reference_final


def test_engine_killed_during_a_save_recovers_and_matches(prefect_server, reference_final: bytes,
                                                          base_dir: Path) -> None:
    """The engine process dies halfway through writing checkpoint 3: the half-written checkpoint
    never becomes the latest, the flow brings the session up again and resumes at 2."""
    faulty = run_cli(["run", "configs/local.yaml", "--run-name", "faulty", "--base-dir", str(base_dir), *SMALL],
                     cli_env(prefect_server, **FAULT_AT_SAVE_3))
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    assert "engine session lost" in faulty.stdout + faulty.stderr
    paths = RunPaths.of(base_dir, "faulty")
    assert (paths.run_dir / ".fault-at-save-3").exists()  # the fault did fire
    manifest = Manifest.load(paths)
    assert [a.start_rollout_id for a in manifest.resume_history] == [0, 2]
    assert (paths.run_dir / FINAL).read_bytes() == reference_final
    assert not list(paths.checkpoints.glob("*.tmp-*"))  # the unfinished save was removed on resume


def test_whole_run_killed_during_a_save_resumes_and_matches(prefect_server, reference_final: bytes,
                                                            base_dir: Path) -> None:
    """Every process of the run (CLI, Ray head, engine) is SIGKILLed while checkpoint 3 is half
    written: the same command continues at 2 and ends byte-identical to the uninterrupted run."""
    paths = RunPaths.of(base_dir, "crashed")
    args = ["run", "configs/local.yaml", "--run-name", "crashed", "--base-dir", str(base_dir), *SMALL]
    env = cli_env(prefect_server, **FAULT_AT_SAVE_3, KIMI_TEST_FAULT_MODE="pause")
    proc = subprocess.Popen([*CLI, *args], cwd=REPO, env=env, text=True, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (paths.run_dir / ".fault-at-save-3").exists():  # the engine is inside save 3 now
            assert proc.poll() is None and time.monotonic() < deadline, "the run never reached save 3"
            time.sleep(0.1)
        assert list(paths.checkpoints.glob("iter_0000003.tmp-*"))  # half written ...
        assert latest_checkpoint(paths) == 1  # ... and not the latest
        _kill_machine(proc, paths)
        resumed = run_cli(args, cli_env(prefect_server))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _stop_leftover_head(paths)
    manifest = Manifest.load(paths)
    assert [a.start_rollout_id for a in manifest.resume_history] == [0, 2]
    assert (paths.run_dir / FINAL).read_bytes() == reference_final
    assert not list(paths.checkpoints.glob("*.tmp-*"))
    client = MlflowClient(manifest.mlflow_tracking_uri)
    assert _steps(client, manifest.mlflow_run_id, "rollout/raw_reward") == [0, 1, 2, 3, 4, 5]


def test_deployment_runs_through_a_process_worker(prefect_server, base_dir: Path) -> None:
    env = cli_env(prefect_server, KIMI_GRPO_REPO=str(REPO))
    prefect = [str(Path(CLI[0]).with_name("prefect"))]

    def prefect_cli(*args: str, timeout: float = 300) -> str:
        proc = subprocess.run([*prefect, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    prefect_cli("work-pool", "create", "kimi-local", "--type", "process", "--overwrite")
    prefect_cli("--no-prompt", "deploy", "--all")
    overrides = json.dumps([a for a in SMALL[2:] if a != "--set"])
    out = prefect_cli("deployment", "run", "kimi-k25-grpo/local", "-p", f"base_dir={base_dir}",
                      "-p", "num_rollout=3", "-p", f"overrides={overrides}", "-p", "run_name=deployed")
    flow_run_id = out.split("/runs/flow-run/")[1].split()[0].strip()
    prefect_cli("worker", "start", "--pool", "kimi-local", "--run-once", timeout=600)
    state = prefect_cli("flow-run", "inspect", flow_run_id)
    assert "COMPLETED" in state.upper().replace("'", "")
    paths = RunPaths.of(base_dir, "deployed")
    assert Manifest.load(paths).finished and latest_checkpoint(paths) == 2


def _ray_daemons() -> set[int]:
    """Pids of live Ray GCS servers and raylets on this machine."""
    found = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            command = " ".join(proc.info["cmdline"] or [proc.info["name"] or ""])
            if "gcs_server" in command or "raylet" in command:
                found.add(proc.pid)
    return found


def test_failed_run_names_the_row_and_leaves_no_cluster_running(prefect_server, base_dir: Path) -> None:
    """A permanent failure (a malformed data row) stops the run with exit 1 and the file and line;
    the Ray head that came up meanwhile is stopped, and nothing is retried."""
    bad = base_dir / "bad.jsonl"
    bad.write_text('{"prompt": "1+1? Answer in \\\\boxed{}.", "label": "2"}\n{"prompt": "x", "label": 3}\n')
    before = _ray_daemons()
    temp_dirs = _ray_temp_dirs()
    proc = run_cli(["run", "configs/local.yaml", "--run-name", "broken", "--base-dir", str(base_dir), *SMALL,
                    "--set", f"data.prompt_data={bad}"], cli_env(prefect_server))
    assert proc.returncode == 1
    assert "run failed" in proc.stderr and f"{bad}:2" in proc.stderr
    for kept in _ray_temp_dirs() - temp_dirs:  # the logs of a head that ran the flow stay, and are named
        assert f"the stopped Ray head's logs: {kept}" in proc.stdout + proc.stderr
        shutil.rmtree(kept)
    manifest = Manifest.load(RunPaths.of(base_dir, "broken"))
    assert manifest.stages["bring_up_cluster"].status == "stopped" and manifest.ray_address is None
    assert "prepare_data" not in manifest.stages or manifest.stages["prepare_data"].status != "completed"
    assert not manifest.finished and manifest.mlflow_run_id is None  # failed before the session opened
    assert not _ray_daemons() - before  # the head started for this run is gone


def test_kill_during_start_up_leaves_no_ray_head(prefect_server, base_dir: Path) -> None:
    """SIGKILL of the whole `kimi-grpo run` process group while the Ray head is coming up: the head
    (in a session of its own) was recorded before it became ready, so the rerun stops it; whatever
    the kill left unrecorded ends itself when its lease goes stale. Afterwards no Ray process of the
    run is left (pids compared with those before the run; nothing is killed by name)."""
    before = _ray_daemons()
    paths = RunPaths.of(base_dir, "killed-early")
    args = ["run", "configs/local.yaml", "--run-name", "killed-early", "--base-dir", str(base_dir), *SMALL,
            "--num-rollout", "2"]
    proc = subprocess.Popen([*CLI, *args], cwd=REPO, env=cli_env(prefect_server), text=True, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:  # the head is spawned and recorded, not yet ready
            assert proc.poll() is None and time.monotonic() < deadline, "the run never started its Ray head"
            if paths.manifest.is_file():
                record = Manifest.load(paths).stages.get("bring_up_cluster")
                if record is not None and record.status == "starting":
                    break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        leaked = _ray_daemons() - before
        resumed = run_cli(args, cli_env(prefect_server))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60  # the lease (30 s) of a head the kill left behind
    while (_ray_daemons() - before) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _ray_daemons() - before, f"Ray processes left: {_ray_daemons() - before} (after the kill: {leaked})"
    assert latest_checkpoint(paths) == 1
