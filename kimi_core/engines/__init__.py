"""Engines behind the protocol of `base.Engine` (DESIGN §5), chosen from the recipe."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kimi_core.engines.base import EngineInputs
    from kimi_core.engines.local import LocalEngine
    from kimi_core.recipe import Recipe
    from kimi_core.run_state import RunPaths


def make_engine(recipe: Recipe, *, paths: RunPaths, inputs: EngineInputs) -> LocalEngine:
    """The engine for `recipe.cluster.accelerator`: the in-process torch engine on CPU.

    The GPU engine (Megatron-core actor + SGLang rollout engines, colocated, as miles runs the
    Kimi-K2.5 recipe) is not part of this package yet: recipes for it validate, render (sbatch,
    Ray bring-up, miles flags) and run their data and checkpoint stages, but their training
    session raises here instead of loading a 1T-parameter model into the CPU engine.
    """
    if recipe.cluster.accelerator != "cpu":
        raise NotImplementedError(
            f"no GPU engine: recipe {recipe.name!r} has cluster.accelerator={recipe.cluster.accelerator!r}, and the "
            "Megatron + SGLang engine (miles' train.py) is not implemented here; run the rendered miles flags "
            "(kimi-grpo render --what miles-args) with miles, or use a CPU recipe such as configs/local.yaml"
        )
    from kimi_core.engines.base import EngineInputs
    from kimi_core.engines.local import LocalEngine

    return LocalEngine(recipe, paths=paths, inputs=inputs)
