"""What a stage job runs: one `kimi_core.stages` function for the run's recipe; and the stage's
check for an output that is current (`current_*`), which the flow makes itself before it starts a
local job (`jobs.py`).

Kept apart from `jobs.py` (which submits and watches the jobs, and imports MLflow through the
ledger) so that a job process imports only the recipe and the stage: `kimi_core.stages` imports
torch only when there is work, so a job whose output is current starts and ends in about a second.
"""

from __future__ import annotations

from typing import Any

from kimi_core import stages
from kimi_core.runtime.context import RunContext


def prepare_data_job(ctx: RunContext) -> dict[str, Any]:
    recipe = ctx.recipe()
    return stages.prepare_data(recipe, ctx.paths(recipe))


def acquire_model_job(ctx: RunContext) -> dict[str, Any]:
    recipe = ctx.recipe()
    return stages.acquire_model(recipe, ctx.paths(recipe))


def convert_checkpoint_job(ctx: RunContext, hf_checkpoint: str) -> dict[str, Any]:
    recipe = ctx.recipe()
    return stages.convert_checkpoint(recipe, ctx.paths(recipe), hf_checkpoint=hf_checkpoint)


def current_data(ctx: RunContext) -> dict[str, Any] | None:
    recipe = ctx.recipe()
    return stages.current_data(recipe, ctx.paths(recipe))


def current_model(ctx: RunContext) -> dict[str, Any] | None:
    recipe = ctx.recipe()
    return stages.current_model(recipe, ctx.paths(recipe))


def current_conversion(ctx: RunContext, hf_checkpoint: str) -> dict[str, Any] | None:
    recipe = ctx.recipe()
    return stages.current_conversion(recipe, ctx.paths(recipe), hf_checkpoint=hf_checkpoint)
