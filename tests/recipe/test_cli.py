"""`kimi-grpo validate` and `render`: output, exit codes, and the hand-written miles flag goldens."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "miles-args"


def test_validate_k25_shows_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ROOT / "configs/kimi-k25-grpo.yaml")]) == 0
    out = capsys.readouterr().out
    for needle in ["world size", "256", "7 x 8 layers + 5", "SGLang engines", "32",
                   "before rollout 0; after rollouts 19", "after rollouts 19"]:
        assert needle in out, needle


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["grpo.eps_clipp=0.1"], "grpo.eps_clipp"),
        (['parallel.tensor="8"'], "parallel.tensor"),
        (["parallel.tensor=7"], "parallel.tensor"),
        (["parallel.expert=30"], "parallel.expert"),
        (["model.architecture.bogus=1"], "model.architecture.bogus"),
    ],
)
def test_invalid_recipe_exits_2_naming_the_key(overrides: list[str], key: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["validate", str(ROOT / "configs/kimi-k25-grpo.yaml")]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert key in captured.err
    assert "Traceback" not in captured.err


def test_console_entry_point_exit_code_and_no_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "validate", "configs/kimi-k25-grpo.yaml", "--set", "parallel.expert=30"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert "parallel.expert" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["kimi-k25-grpo", "kimi-k2-thinking", "kimi-k2-instruct"])
def test_render_miles_args_matches_golden(name: str, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KIMI_GRPO_BASE_DIR", raising=False)
    assert main(["render", str(ROOT / f"configs/{name}.yaml"), "--what", "miles-args"]) == 0
    rendered = capsys.readouterr().out
    golden = (GOLDEN / f"{name}.txt").read_text()
    diff = "\n".join(difflib.unified_diff(golden.splitlines(), rendered.splitlines(), "golden", "rendered", lineterm=""))
    assert rendered == golden, (
        f"rendered miles args differ from tests/golden/miles-args/{name}.txt:\n{diff}\n"
        "The goldens are written by hand from the reference recipe; if the change is intended, edit the golden file."
    )


def test_rendered_flags_never_include_the_nonexistent_filter_flag(capsys: pytest.CaptureFixture[str]) -> None:
    main(["render", str(ROOT / "configs/kimi-k25-grpo.yaml"), "--what", "miles-args"])
    assert "--filter-zero-reward-samples" not in capsys.readouterr().out
