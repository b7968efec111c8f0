"""The recipe: typed sections, loading with clear errors, cross-field rules and the derived plan."""

from kimi_core.recipe.load import (
    BASE_DIR_ENV,
    RecipeError,
    load_profile,
    load_recipe,
    recipe_from_dict,
    recipe_hash,
    recipe_to_dict,
)
from kimi_core.recipe.plan import RunPlan, plan_run, resolve_path
from kimi_core.recipe.sections import RUN_DIR, Recipe

__all__ = [
    "BASE_DIR_ENV",
    "RUN_DIR",
    "Recipe",
    "RecipeError",
    "RunPlan",
    "load_profile",
    "load_recipe",
    "plan_run",
    "recipe_from_dict",
    "recipe_hash",
    "recipe_to_dict",
    "resolve_path",
]
