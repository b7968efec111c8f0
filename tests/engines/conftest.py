"""Fixtures for the engine tests: the local recipe made small, its base model and prepared data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kimi_core.data import prepare_dataset
from kimi_core.engines.local import EngineInputs, LocalEngine
from kimi_core.model.warmup import build_base_model
from kimi_core.recipe import Recipe, load_recipe
from kimi_core.run_state import RunPaths

REPO = Path(__file__).resolve().parents[2]
LOCAL_RECIPE = REPO / "configs" / "local.yaml"
EVAL_SET = "arith"
# 16 max(a,b) problems the warm-up memorises in 100 small steps, so the base model solves some of
# them some of the time (rewards vary within groups) at a few seconds' cost. Rollouts and evals use
# the same 16 problems; the tests are about the engine's mechanics, not about generalisation.
PROBLEMS = "synthetic://arith?seed=1&n=16&split=train&max_operand=99&op=max"
# The local recipe made small: 4 prompts x 4 samples per rollout in 2 optimizer steps of 8, a
# 16-prompt eval at n = 4. The entropy bonus moves the weights even in a rollout whose groups all tie.
SMALL = [
    f"model.warmup.source={PROBLEMS}", "model.warmup.steps=100", "model.warmup.batch_size=8",
    "model.warmup.label_smoothing=0.0", f"data.prompt_data={PROBLEMS}",
    "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=4", "rollout.global_batch_size=8",
    "rollout.max_response_len=16", "grpo.entropy_coef=0.01",
    f'eval.datasets=[{{name: {EVAL_SET}, path: "{PROBLEMS}"}}]', "eval.n_samples_per_prompt=4",
    "eval.max_response_len=16",
]


def small_recipe(*extra: str) -> Recipe:
    return load_recipe(LOCAL_RECIPE, overrides=[*SMALL, *extra])


@dataclass(frozen=True)
class Prepared:
    """The small recipe's base model and prepared data, built once per session."""

    inputs: EngineInputs
    base_dir: Path


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Toy models gain nothing from intra-op threads (and spinning threads slow a shared box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    torch.set_num_threads(1)
    recipe = small_recipe()
    root = tmp_path_factory.mktemp("engine-inputs")
    build_base_model(recipe.model.architecture, root / "base", spec=recipe.model.warmup)
    keys = {"input_key": recipe.data.input_key, "label_key": recipe.data.label_key}
    train = prepare_dataset(recipe.data.prompt_data, out_dir=root / "data", name="train", **keys)
    held_out = prepare_dataset(recipe.eval.datasets[0].path, out_dir=root / "data", name=f"eval-{EVAL_SET}", **keys)
    inputs = EngineInputs(train_data=train.path, eval_data={EVAL_SET: held_out.path}, initial_checkpoint=str(root / "base"))
    return Prepared(inputs=inputs, base_dir=root / "base")


@pytest.fixture
def new_engine(prepared: Prepared, tmp_path: Path):
    """`new_engine(run_name, *overrides) -> LocalEngine` (not started) on the small recipe."""
    engines: list[LocalEngine] = []

    def build(run_name: str, *overrides: str) -> LocalEngine:
        paths = RunPaths.of(tmp_path / "base", run_name).ensure()
        engine = LocalEngine(small_recipe(*overrides), paths=paths, inputs=prepared.inputs)
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.close()
