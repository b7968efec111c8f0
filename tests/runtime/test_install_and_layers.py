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


@pytest.mark.parametrize(("recipe", "cluster", "why"), [
    ("configs/kimi-k25-grpo.yaml", "h200", "cluster.executor='slurm'"),
    ("configs/kimi-k25-grpo.yaml", None, "no GPU engine"),
])
def test_a_recipe_this_install_cannot_run_is_refused_before_anything_runs(
        recipe: str, cluster: str | None, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", str(REPO / recipe), "--base-dir", str(tmp_path / "base"), "--run-name", "refused"]
    argv += ["--cluster", cluster] if cluster else []
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert why in err and "Traceback" not in err
    assert not (tmp_path / "base" / "runs" / "refused").exists()  # no manifest, no stage job, no Ray head
