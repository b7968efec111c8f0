"""Job-shaped stages (data prep, model acquisition, conversion) as jobs of the recipe's executor.

The caller hands in a `JobLauncher` (`slurm.launcher.StageLauncher`: submitit's local executor for
the local recipe, its Slurm executor for a Slurm profile), so this module never imports the
scheduler package. The job id is recorded in the manifest before waiting, so a retried stage
re-attaches to the running job instead of submitting it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

# At import, not in run_job: importing submitit reconfigures logging (dictConfig), which can deadlock
# with the flow's log handler when it happens while stage tasks run concurrently.
from submitit import Job
from submitit.core.utils import FailedJobError

from kimi_core.recipe import Recipe
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.failures import PermanentFailure, is_transient, job_error_line
from kimi_core.runtime.job_payloads import (
    acquire_model_job,
    convert_checkpoint_job,
    current_conversion,
    current_data,
    current_model,
    prepare_data_job,
)
from kimi_core.runtime.ledger import RunLedger, cache_key

STAGE_VERSION = "2"
#: Seconds between checks of a job on this machine (submitit itself looks once a second).
LOCAL_POLL_S = 0.1


class JobLauncher(Protocol):
    """Submits one stage's job, or re-attaches to an earlier attempt's job of it."""

    @property
    def on_slurm(self) -> bool:
        """Jobs go to Slurm: their ids are recorded in the run manifest (and MLflow's `slurm_job_ids`)."""

    def launch(self, stage: str, fn: Callable[..., dict[str, Any]], *args: Any,
               reattach_to: str | None) -> Job[dict[str, Any]]: ...


def stage_key(name: str, recipe: Recipe) -> str:
    """What identifies a stage's job across attempts (its inputs' content is checked by the stage)."""
    sections = {"prepare_data": (recipe.data, recipe.eval), "acquire_model": (recipe.checkpoint, recipe.model),
                "convert_checkpoint": (recipe.checkpoint,)}[name]
    return cache_key(STAGE_VERSION, name, [s.model_dump() for s in sections])


def run_job(ledger: RunLedger, launcher: JobLauncher, name: str, fn: Callable[..., dict[str, Any]],
            *args: Any) -> dict[str, Any]:
    """Run `fn(*args)` as a job of stage `name`, re-attaching to an earlier attempt's job of the same
    stage and key instead of submitting again; a job whose own code raised is a permanent failure
    (named in one line) unless its error is worth a retry."""
    key = stage_key(name, ledger.recipe)
    previous = ledger.manifest.stages.get(name)
    job_id = None
    if previous is not None and previous.status == "submitted" and previous.cache_key == key:
        job_id = previous.result.get("job_id")
    job = launcher.launch(name, fn, *args, reattach_to=job_id)
    ledger.manifest.record_stage(name, cache_key=key, result={"job_id": str(job.job_id)}, status="submitted")
    if launcher.on_slurm:
        ledger.manifest.add_slurm_job_id(str(job.job_id))
    else:
        while not job.done():
            time.sleep(LOCAL_POLL_S)
    try:
        return job.result()
    except FailedJobError as exc:  # the stage's own code raised: say what, briefly, unless worth a retry
        if is_transient(exc):
            raise
        last = job_error_line(str(exc)) or str(exc).strip()
        raise PermanentFailure(f"stage {name} (job {job.job_id}) failed: {last} "
                               f"(full log: {job.paths.stderr})") from None


def _stage(ctx: RunContext, launcher: JobLauncher, name: str, fn: Callable[..., dict[str, Any]],
           current: Callable[..., dict[str, Any] | None], *args: Any) -> dict[str, Any]:
    """Stage `name` as a job running `fn(*args)`. With the local executor the flow first makes the
    stage's own check for a current output, `current(*args)` (torch-free; it hashes the inputs as the
    job would), and starts no job when it finds one: a job costs a Python interpreter's start-up
    (about a second of CPU) on the machine the run shares. On Slurm the job makes the check, on the
    node with the files."""
    ledger = RunLedger(ctx)

    def run() -> dict[str, Any]:
        if not launcher.on_slurm:
            try:
                found = current(*args)
            except Exception:  # the job meets the same problem and reports it as the stage's failure
                found = None
            if found is not None:
                return found
        return run_job(ledger, launcher, name, fn, *args)

    return ledger.stage(name, run, key=stage_key(name, ledger.recipe))


def prepare_data(ctx: RunContext, launcher: JobLauncher) -> dict[str, Any]:
    """Stage: validated, deduplicated training and eval data under the run directory."""
    return _stage(ctx, launcher, "prepare_data", prepare_data_job, current_data, ctx)


def acquire_model(ctx: RunContext, launcher: JobLauncher) -> dict[str, Any]:
    """Stage: the verified (or, locally, built) HF checkpoint of the actor."""
    return _stage(ctx, launcher, "acquire_model", acquire_model_job, current_model, ctx)


def convert_checkpoint(ctx: RunContext, launcher: JobLauncher, model: dict[str, Any]) -> dict[str, Any]:
    """Stage: the reference / initial weights in the format the trainer loads."""
    return _stage(ctx, launcher, "convert_checkpoint", convert_checkpoint_job, current_conversion, ctx,
                  model["hf_checkpoint"])
