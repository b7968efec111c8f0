"""Job-shaped stages (data prep, model acquisition, conversion) as submitit jobs.

The local recipe uses submitit's local executor; a Slurm profile, its Slurm executor. The job id is
recorded in the manifest before waiting, so a retried stage re-attaches to the running job
instead of submitting it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kimi_core.runtime.failures import PermanentFailure, is_transient, job_error_line
from kimi_core import stages
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.ledger import RunDriver, cache_key, file_identity
from kimi_core.recipe import Recipe, resolve_path
# At import, not in run_job: importing submitit reconfigures logging (dictConfig), which can deadlock
# with the flow's log handler when it happens while stage tasks run concurrently.
from submitit.core.utils import FailedJobError

from slurm.executors import make_executor, submit_or_reattach
from slurm.from_recipe import stage_job_request

STAGE_VERSION = "1"
#: Time limit of a stage job run by submitit's local executor (its own default is 2 minutes).
LOCAL_JOB_TIMEOUT_MIN = 4 * 60
#: Seconds between checks of a local stage job.
LOCAL_POLL_S = 0.1


def data_key(recipe: Recipe) -> str:
    sources = [recipe.data.prompt_data, *(d.path for d in recipe.eval.datasets)]
    return cache_key(STAGE_VERSION, recipe.data.model_dump(), recipe.eval.model_dump(),
                     [file_identity(resolve_path(recipe, s)) for s in sources])


def model_key(recipe: Recipe) -> str:
    return cache_key(STAGE_VERSION, recipe.checkpoint.hf_checkpoint, recipe.model.model_dump(),
                     stages.WARMUP_VERSION,
                     file_identity(resolve_path(recipe, recipe.checkpoint.hf_checkpoint)))


def run_job(driver: RunDriver, name: str, key: str, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Submit `fn(*args)` with the recipe's executor, re-attaching to an earlier attempt's job of the
    same stage and key instead of submitting again."""
    recipe = driver.recipe
    folder = driver.paths.logs / "jobs" / name
    executor = make_executor(recipe.cluster.executor, folder,
                             request=stage_job_request(recipe, name=f"{driver.paths.run_name}-{name}", output_dir=folder))
    if recipe.cluster.executor == "local":
        executor.update_parameters(timeout_min=LOCAL_JOB_TIMEOUT_MIN)
    previous = driver.manifest.stages.get(name)
    job_id = None
    if previous is not None and previous.status == "submitted" and previous.cache_key == key:
        job_id = previous.result.get("job_id")
    job = submit_or_reattach(executor, fn, *args, job_id=job_id, folder=folder)
    driver.manifest.record_stage(name, cache_key=key, result={"job_id": str(job.job_id)}, status="submitted")
    if recipe.cluster.executor == "slurm":
        driver.manifest.add_slurm_job_id(str(job.job_id))
    else:
        while not job.done():  # submitit looks once a second; a local job is watched more closely
            time.sleep(LOCAL_POLL_S)
    try:
        return job.result()
    except FailedJobError as exc:  # the stage's own code raised: say what, briefly, unless worth a retry
        if is_transient(exc):
            raise
        last = job_error_line(str(exc)) or str(exc).strip()
        raise PermanentFailure(f"stage {name} (job {job.job_id}) failed: {last} "
                               f"(full log: {job.paths.stderr})") from None


def convert_key(recipe: Recipe, model: dict[str, Any]) -> str:
    return cache_key(STAGE_VERSION, model.get("hf_checkpoint"), model.get("num_tensors"), recipe.checkpoint.model_dump())


def _staged(driver: RunDriver, name: str, key: str, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    return driver.stage(name, lambda: run_job(driver, name, key, fn, *args), key=key)


def prepare_data(ctx: RunContext) -> dict[str, Any]:
    """Stage: validated, deduplicated training and eval data under the run directory."""
    driver = RunDriver(ctx)
    return _staged(driver, "prepare_data", data_key(driver.recipe), stages.prepare_data_job, ctx)


def acquire_model(ctx: RunContext) -> dict[str, Any]:
    """Stage: the verified (or, locally, built) HF checkpoint of the actor."""
    driver = RunDriver(ctx)
    return _staged(driver, "acquire_model", model_key(driver.recipe), stages.acquire_model_job, ctx)


def convert_checkpoint(ctx: RunContext, model: dict[str, Any]) -> dict[str, Any]:
    """Stage: the reference / initial weights in the format the trainer loads."""
    driver = RunDriver(ctx)
    return _staged(driver, "convert_checkpoint", convert_key(driver.recipe, model), stages.convert_checkpoint_job, ctx,
                   model["hf_checkpoint"])
