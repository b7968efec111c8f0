"""What an install must give: runtime requirements of the package itself, a flow module that does not
pull torch, and a recipe this install cannot run refused before anything is created or submitted."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from flows.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_the_package_requires_the_fastapi_bound_prefect_needs_at_run_time() -> None:
    """A cluster install (`pip install -e .`, no constraints file) must not get a fastapi whose server
    Prefect 3.8.8 cannot start."""
    requirements = [r.replace(" ", "") for r in metadata.requires("kimi-k25-grpo") or []]
    assert "fastapi<0.151" in requirements, requirements


def test_importing_the_flow_does_not_import_torch() -> None:
    code = ("import sys, flows.pipeline, flows.cli, tasks.training, tasks.stages\n"
            "heavy = sorted(m for m in ('torch', 'megatron', 'transformers', 'sglang') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the flow imported: {out.stdout.strip()}"


def test_the_checks_before_the_early_ray_head_import_no_tracker_orchestrator_or_ray() -> None:
    """`kimi-grpo run` starts the run's Ray head right after its recipe checks (`preflight`): whatever
    those import delays the head, and MLflow alone took 1.5-2.5 s on 2 cores."""
    code = ("import sys, flows.cli, flows.checks, kimi_core.runtime.status, kimi_core.runtime.local_head\n"
            "heavy = sorted(m for m in ('mlflow', 'prefect', 'ray', 'torch', 'megatron') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the checks before the early Ray head imported: {out.stdout.strip()}"


@pytest.mark.parametrize(("recipe", "cluster", "why"), [
    ("configs/kimi-k25-grpo.yaml", "h200", "not found on PATH (cluster.executor=slurm)"),
    ("configs/kimi-k25-grpo.yaml", None, "no GPU engine"),
])
def test_a_recipe_this_install_cannot_run_is_refused_before_anything_runs(
        recipe: str, cluster: str | None, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm here, whether or not this machine has it
    argv = ["run", str(REPO / recipe), "--base-dir", str(tmp_path / "base"), "--run-name", "refused"]
    argv += ["--cluster", cluster] if cluster else []
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert why in err and "Traceback" not in err
    assert not (tmp_path / "base" / "runs" / "refused").exists()  # no manifest, no stage job, no Ray head


def test_a_multi_node_gpu_run_without_a_tracking_server_is_refused_before_submitting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """32 GPU nodes cannot share an sqlite file: with no tracking server configured, `sbatch` exits 2
    before anything is written or submitted; with one, the check passes (a dry run prints the script)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = ["sbatch", str(REPO / "configs/kimi-k25-grpo.yaml"), "--cluster", "h200", "--base-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "MLflow tracking server" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    from kimi_core.recipe import load_recipe
    from kimi_core.run_state import RunPaths
    from kimi_core.runtime.tracking_uri import tracking_uri_for

    recipe = load_recipe(REPO / "configs/kimi-k25-grpo.yaml", cluster="h200", base_dir=str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri_for(recipe, RunPaths.of(tmp_path, "x")) == "http://127.0.0.1:5000"
