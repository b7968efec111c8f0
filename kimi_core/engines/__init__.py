"""Engines behind the protocol of `base.Engine` (docs/design.md §5), chosen from the recipe."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kimi_core.engines.base import Engine, EngineInputs
    from kimi_core.recipe import Recipe
    from kimi_core.run_state import RunPaths


def engine_name(recipe: Recipe) -> str:
    """The engine `recipe` trains on (also the MLflow `engine` tag): `local` on CPU, `miles` on GPU."""
    return "local" if recipe.cluster.accelerator == "cpu" else "miles"


def miles_available() -> bool:
    """Whether the miles API can be loaded here, decided without importing miles: a test double named
    by `$KIMI_GRPO_MILES_API`, or an installed `miles` package (the miles container)."""
    from kimi_core.engines.miles.api import api_override  # noqa: PLC0415 - keeps this module import-light

    return api_override() is not None or importlib.util.find_spec("miles") is not None


def engine_unavailable(recipe: Recipe) -> str | None:
    """Why this install has no engine for `recipe`, or None when it has one.

    CPU recipes run on `LocalEngine`. GPU recipes run on `MilesEngine` (Megatron-core actor +
    SGLang rollout engines through miles' train.py, docs/design.md §5), which needs the miles
    container: without an importable `miles` the recipe validates and renders (sbatch, Ray
    bring-up, miles flags) but cannot train here.
    """
    if engine_name(recipe) == "local" or miles_available():
        return None
    return (f"no GPU engine: recipe {recipe.name!r} has cluster.accelerator={recipe.cluster.accelerator!r}, and its "
            "Megatron + SGLang engine (MilesEngine, driving miles' train.py) needs the miles container: the `miles` "
            "package is not installed here; run it inside the miles image, render the flags "
            "(kimi-grpo render --what miles-args), or use a CPU recipe such as configs/local.yaml")


def make_engine(recipe: Recipe, *, paths: RunPaths, inputs: EngineInputs) -> Engine:
    """The engine for `recipe.cluster.accelerator`: the in-process torch engine on CPU, `MilesEngine`
    on GPU (miles itself is imported only when that engine starts)."""
    missing = engine_unavailable(recipe)
    if missing is not None:
        raise NotImplementedError(missing)
    if engine_name(recipe) == "miles":
        from kimi_core.engines.miles.engine import MilesEngine  # noqa: PLC0415 - no torch/miles at import

        return MilesEngine(recipe, paths=paths, inputs=inputs)
    from kimi_core.engines.local import LocalEngine  # noqa: PLC0415 - torch only in the engine's process

    return LocalEngine(recipe, paths=paths, inputs=inputs)
