"""`StageLauncher`: submits a run's stage jobs with the executor its cluster profile names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from kimi_core.recipe import Recipe
from slurm.executors import make_executor, submit_or_reattach
from slurm.from_recipe import stage_job_request

#: Time limit of a stage job run by submitit's local executor (its own default is 2 minutes).
LOCAL_JOB_TIMEOUT_MIN = 4 * 60


@dataclass(frozen=True)
class StageLauncher:
    """Stage jobs of one run: logs under `{logs}/jobs/<stage>/`, job names `<run>-<stage>`."""

    recipe: Recipe
    run_name: str
    logs: Path

    @property
    def on_slurm(self) -> bool:
        return self.recipe.cluster.executor == "slurm"

    def launch(self, stage: str, fn: Callable[..., dict[str, Any]], *args: Any,
               reattach_to: str | None) -> submitit.Job[dict[str, Any]]:
        """Submit `fn(*args)` as the job of `stage` (or re-attach to `reattach_to`); a failed sbatch raises
        `slurm.errors.SbatchRejected` (permanent) or `SchedulerBusy` (transient, retried by the task)."""
        folder = self.logs / "jobs" / stage
        request = stage_job_request(self.recipe, name=f"{self.run_name}-{stage}", output_dir=folder)
        executor = make_executor(self.recipe.cluster.executor, folder, request=request)
        if not self.on_slurm:
            executor.update_parameters(timeout_min=LOCAL_JOB_TIMEOUT_MIN)
        return submit_or_reattach(executor, fn, *args, job_id=reattach_to, folder=folder)
