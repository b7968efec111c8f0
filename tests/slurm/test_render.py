"""Golden tests of the rendered sbatch scripts, and validation of the typed requests."""

from __future__ import annotations

import difflib
import os
import subprocess
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from kimi_core.recipe import load_recipe
from slurm.ray_job import RaySlurmJobs
from slurm.render import render_conversion_job
from slurm.requests import SlurmJobRequest

REPO = Path(__file__).resolve().parents[2]
GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden" / "slurm"
UPDATE_ENV = "KIMI_GRPO_UPDATE_GOLDEN"

# A site profile as the cluster YAML would give it (the image is a placeholder).
H200_PROFILE = {
    "partition": "h200",
    "account": "rl",
    "qos": "high",
    "container_image": "nvcr.io#example/miles:placeholder",
    "output_dir": "/shared/runs/kimi-k25-grpo/slurm",
}


def h200_request(job_name: str, **overrides: object) -> SlurmJobRequest:
    fields: dict[str, object] = {
        "job_name": job_name, "nodes": 32, "gpus_per_node": 8, "cpus_per_task": 64,
        "mem_per_gpu": "200G", "time_limit": "48:00:00", "exclusive": True,
        "extra_env": {"NCCL_DEBUG": "WARN"}, **H200_PROFILE,
    }
    return SlurmJobRequest(**(fields | overrides))


def local_request(job_name: str) -> SlurmJobRequest:
    return SlurmJobRequest(
        job_name=job_name, nodes=1, gpus_per_node=0, cpus_per_task=2, partition="debug",
        time_limit="00:30:00", output_dir="runs/slurm",
    )


def assert_matches_golden(rendered: str, name: str) -> None:
    """Line-by-line comparison with tests/golden/slurm/NAME; the message shows the diff."""
    path = GOLDEN_DIR / name
    if os.environ.get(UPDATE_ENV) == "1":
        path.write_text(rendered)
    expected = path.read_text()
    if rendered != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), rendered.splitlines(keepends=True),
            fromfile=f"golden/{name}", tofile="rendered"))
        pytest.fail(f"{name} differs from its golden copy:\n{diff}\nIf the change is intended, "
                    f"accept it with: {UPDATE_ENV}=1 pytest tests/slurm", pytrace=False)


def _ray_job_script(recipe_path: str, profile: str, *overrides: str) -> str:
    """The Ray job's sbatch text for a fixed base dir and interpreter (both machine-specific otherwise)."""
    recipe = load_recipe(REPO / recipe_path, overrides=list(overrides), cluster=profile, base_dir="/shared/kimi")
    run_dir = Path("/shared/kimi/runs/golden")
    jobs = RaySlurmJobs.for_run(recipe, run_name="golden", run_dir=run_dir, python="/opt/venv/bin/python",
                                deadline_mark_prefix=str(run_dir / "ray" / "deadline-"))
    return jobs.script()


def test_ray_job_h200_golden() -> None:
    script = _ray_job_script("configs/kimi-k25-grpo.yaml", "h200")
    assert "--kill-on-bad-exit=1" in script and "#SBATCH --signal=B:USR1@900" in script
    assert "#SBATCH --no-requeue" in script and "#SBATCH --job-name=golden-ray" in script
    assert_matches_golden(script, "ray_job_h200.sbatch")


def test_ray_job_localhost_slurm_golden() -> None:
    script = _ray_job_script("configs/local.yaml", "localhost-slurm", "cluster.num_nodes=2")
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    assert_matches_golden(script, "ray_job_localhost_slurm.sbatch")


def test_ray_job_deadline_trap_marks_without_waiting_for_srun(tmp_path: Path) -> None:
    """The batch shell's USR1 trap runs while `srun` still runs (bash defers traps of foreground
    commands), and the exit status of the wrapped `srun` is kept."""
    script = _ray_job_script("configs/local.yaml", "localhost-slurm", "cluster.num_nodes=2")
    setup = script.split("# setup\n", 1)[1].split("\n\n", 1)[0].replace("/shared/kimi/runs/golden/ray", str(tmp_path))
    fake_srun = tmp_path / "bin" / "srun"
    fake_srun.parent.mkdir()
    fake_srun.write_text("#!/bin/bash\nsleep 3\nexit 7\n")
    fake_srun.chmod(0o755)
    driver = f"SLURM_JOB_ID=42\n{setup}\n(sleep 1; kill -USR1 $$) &\nsrun x\necho rc=$? mark=$(ls {tmp_path})\n"
    started = time.monotonic()
    out = subprocess.run(["bash", "-c", driver], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PATH": f"{fake_srun.parent}:{os.environ['PATH']}"})
    assert "rc=7" in out.stdout and "deadline-42" in out.stdout, out.stdout + out.stderr
    assert (tmp_path / "deadline-42").exists() and time.monotonic() - started < 10


def test_conversion_h200_golden() -> None:
    script = render_conversion_job(
        h200_request("kimi-k25-convert"), nproc_per_node=8, master_port=29500,
        command_args=["-m", "kimi_core.convert", "--hf-dir", "/shared/models/Kimi-K2.5",
                      "--out-dir", "/shared/runs/kimi-k25-grpo/ref torch_dist"])
    assert_matches_golden(script, "conversion_h200_32n.sbatch")


def test_conversion_local_golden() -> None:
    script = render_conversion_job(
        local_request("kimi-local-convert"), nproc_per_node=2, master_port=29500,
        command_args=["tools/convert.py", "--out-dir", "runs/local/ref_torch_dist"])
    assert_matches_golden(script, "conversion_local_1n.sbatch")


@pytest.mark.parametrize("name", sorted(p.name for p in GOLDEN_DIR.glob("*.sbatch")))
def test_golden_scripts_are_valid_bash(name: str) -> None:
    result = subprocess.run(["bash", "-n", str(GOLDEN_DIR / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_unknown_field_rejected() -> None:
    with pytest.raises(ValidationError, match="gpus_per_nod"):
        SlurmJobRequest(job_name="x", nodes=1, gpus_per_node=0, cpus_per_task=1, partition="p",
                        time_limit="01:00:00", output_dir="o", gpus_per_nod=8)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("time_limit", "48h", "HH:MM:SS"),
    ("time_limit", "01:60:00", "HH:MM:SS"),
    ("job_name", "bad name", "job_name"),
    ("mem", "lots", "memory"),
    ("container_image", "img; rm -rf /", "container_image"),
    ("extra_env", {"1BAD": "x"}, "invalid variable names"),
    ("signal_before_deadline_s", 3600, "shorter than time_limit"),
])
def test_invalid_request_fields(field: str, value: object, message: str) -> None:
    fields = {"job_name": "x", "nodes": 1, "gpus_per_node": 0, "cpus_per_task": 1,
              "partition": "p", "time_limit": "01:00:00", "output_dir": "o", field: value}
    with pytest.raises(ValidationError, match=message):
        SlurmJobRequest(**fields)


def test_mem_and_mem_per_gpu_are_exclusive() -> None:
    with pytest.raises(ValidationError, match="only one of mem and mem_per_gpu"):
        h200_request("x", mem="100G")


def test_request_is_frozen_and_time_limit_in_seconds() -> None:
    req = h200_request("x")
    assert req.time_limit_s == 48 * 3600
    with pytest.raises(ValidationError):
        req.nodes = 2  # type: ignore[misc]


def test_conversion_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="master_port"):
        render_conversion_job(local_request("x"), nproc_per_node=1, master_port=40000,
                              command_args=["a.py"])
    with pytest.raises(ValueError, match="command_args is empty"):
        render_conversion_job(local_request("x"), nproc_per_node=1, master_port=29500,
                              command_args=[])
    with pytest.raises(ValueError, match="signal_before_deadline_s"):
        render_conversion_job(h200_request("x", signal_before_deadline_s=60), nproc_per_node=8,
                              master_port=29500, command_args=["a.py"])
