"""The scheduler check run before anything is submitted, shared by the CLI and the flow."""

from __future__ import annotations

from kimi_core.recipe import Recipe
from kimi_core.runtime.failures import NotRunnableHere
from slurm.checks import SlurmUnavailable, check_slurm


def check_scheduler(recipe: Recipe) -> None:
    """For a Slurm profile, check that the cluster can take the recipe's jobs (`slurm.checks.check_slurm`);
    raises `NotRunnableHere` (exit 2, nothing submitted) naming the key or command and the fix."""
    if recipe.cluster.executor != "slurm":
        return
    try:
        check_slurm(recipe)
    except SlurmUnavailable as err:
        raise NotRunnableHere(str(err)) from None
