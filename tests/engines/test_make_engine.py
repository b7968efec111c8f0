"""Engine selection: the CPU recipe gets the torch engine; a GPU recipe without miles installed gets a
clear NotImplementedError (with miles, `MilesEngine`: tests/engines/test_miles_engine.py)."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest

from kimi_core.engines import make_engine
from kimi_core.engines.base import Engine
from kimi_core.engines.local import EngineInputs, LocalEngine
from kimi_core.recipe import load_recipe
from kimi_core.run_state import RunPaths

REPO = Path(__file__).resolve().parents[2]
INPUTS = EngineInputs(train_data="train.jsonl", eval_data={}, initial_checkpoint="model")


def test_cpu_recipe_gets_the_local_engine(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "configs/local.yaml", base_dir=str(tmp_path))
    engine = make_engine(recipe, paths=RunPaths.of(tmp_path, "r"), inputs=INPUTS)
    assert isinstance(engine, LocalEngine)


def test_gpu_recipe_names_the_missing_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KIMI_GRPO_MILES_API", raising=False)
    if importlib.util.find_spec("miles") is not None:
        pytest.skip("miles is installed here: the GPU engine is available")
    recipe = load_recipe(REPO / "configs/kimi-k25-grpo.yaml", base_dir=str(tmp_path))
    assert recipe.cluster.accelerator == "gpu"
    with pytest.raises(NotImplementedError, match="Megatron \\+ SGLang engine .* needs the miles container"):
        make_engine(recipe, paths=RunPaths.of(tmp_path, "r"), inputs=INPUTS)


def test_the_local_engine_implements_the_protocol_with_its_exact_signatures() -> None:
    for name in ("start", "train_rollout", "evaluate", "close"):
        protocol, local = inspect.signature(getattr(Engine, name)), inspect.signature(getattr(LocalEngine, name))
        assert local == protocol, f"{name}: LocalEngine{local} != Engine{protocol}"
    assert not hasattr(LocalEngine, "save") and not hasattr(Engine, "save")
