"""The container recipe pins what the code assumes: miles at `MILES_COMMIT`, Ray in pyproject's range."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from kimi_core.engines.miles import MILES_COMMIT

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "containers/miles/Dockerfile"


def _arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S*)\s*$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert match, f"containers/miles/Dockerfile has no `ARG {name}=<default>`"
    return match.group(1).strip('"')


def _ray_range() -> tuple[tuple[int, ...], tuple[int, ...]]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"ray(\[[^]]*\])?\s*[<>=]", d)]
    lower = re.search(r">=\s*([\d.]+)", spec)
    upper = re.search(r"<\s*([\d.]+)", spec)
    assert lower and upper, f"pyproject's Ray requirement {spec!r} is not a >=,< range"
    return _version(lower.group(1)), _version(upper.group(1))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_dockerfile_checks_out_miles_at_the_adapters_commit() -> None:
    assert _arg("MILES_COMMIT") == MILES_COMMIT
    assert 'git checkout -f "${MILES_COMMIT}"' in DOCKERFILE.read_text()


def test_dockerfile_ray_is_in_pyprojects_range() -> None:
    ray = _version(_arg("RAY_VERSION"))
    lower, upper = _ray_range()
    assert len(ray) == 3 and lower <= ray < upper, f"RAY_VERSION {ray} outside pyproject's [{lower}, {upper})"
    assert ray[:2] == lower[:2], "the image's Ray minor must be the one the submit host installs from pyproject"


def test_dockerfile_never_lets_pip_replace_the_images_torch() -> None:
    text = DOCKERFILE.read_text()
    assert "pip install --no-deps -e /opt/kimi-k25-grpo" in text
    installs = [line for line in text.splitlines() if "pip install" in line and "torch" in line]
    assert not installs, installs
