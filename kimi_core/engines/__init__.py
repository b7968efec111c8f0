"""Engines behind the protocol of `base.Engine` (docs/design.md §5), chosen from the recipe."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kimi_core.engines.base import EngineInputs
    from kimi_core.engines.local import LocalEngine
    from kimi_core.recipe import Recipe
    from kimi_core.run_state import RunPaths


def engine_unavailable(recipe: Recipe) -> str | None:
    """Why this install has no engine for `recipe`, or None when it has one.

    The GPU engine (Megatron-core actor + SGLang rollout engines, colocated, as miles runs the
    Kimi-K2.5 recipe) is not part of this package yet: recipes for it validate and render (sbatch,
    Ray bring-up, miles flags), but cannot train here.
    """
    if recipe.cluster.accelerator == "cpu":
        return None
    return (f"no GPU engine: recipe {recipe.name!r} has cluster.accelerator={recipe.cluster.accelerator!r}, and the "
            "Megatron + SGLang engine (miles' train.py) is not implemented here; run the rendered miles flags "
            "(kimi-grpo render --what miles-args) with miles, or use a CPU recipe such as configs/local.yaml")


def make_engine(recipe: Recipe, *, paths: RunPaths, inputs: EngineInputs) -> LocalEngine:
    """The engine for `recipe.cluster.accelerator`: the in-process torch engine on CPU."""
    missing = engine_unavailable(recipe)
    if missing is not None:
        raise NotImplementedError(missing)
    from kimi_core.engines.local import LocalEngine  # noqa: PLC0415 - torch only in the engine's process

    return LocalEngine(recipe, paths=paths, inputs=inputs)
