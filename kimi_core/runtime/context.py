"""`RunContext`: the small, picklable description of a run that every stage receives."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from kimi_core.recipe import Recipe, load_recipe
from kimi_core.run_state import RunPaths


@dataclass(frozen=True)
class RunContext:
    """What identifies a run: the recipe file and its overrides, where it lives, and its name.

    Stages receive this (a few strings) and load the recipe themselves, so nothing large crosses
    task or job boundaries.
    """

    recipe_path: str
    run_name: str | None = None
    cluster: str | None = None
    overrides: tuple[str, ...] = field(default_factory=tuple)
    base_dir: str | None = None
    num_rollout: int | None = None

    def recipe(self) -> Recipe:
        overrides = list(self.overrides)
        if self.num_rollout is not None:
            overrides.append(f"rollout.num_rollout={self.num_rollout}")
        return load_recipe(self.recipe_path, overrides=overrides, cluster=self.cluster, base_dir=self.base_dir)

    def absolute(self, recipe: Recipe) -> RunContext:
        """The same run with absolute paths (the recipe file and the base dir), for processes that may
        start elsewhere (Ray workers on other nodes)."""
        base_dir = recipe.cluster.base_dir
        return dataclasses.replace(self, recipe_path=os.path.abspath(self.recipe_path),
                                   base_dir=os.path.abspath(base_dir) if base_dir and "://" not in base_dir else base_dir)

    def name(self, recipe: Recipe) -> str:
        return self.run_name or recipe.name

    def paths(self, recipe: Recipe) -> RunPaths:
        if recipe.cluster.base_dir is None:
            raise ValueError(
                "cluster.base_dir is not set: pass --base-dir, set $KIMI_GRPO_BASE_DIR, or use a cluster profile"
            )
        return RunPaths.of(Path(recipe.cluster.base_dir), self.name(recipe))
