"""The Ray cluster of a run as one Slurm job, submitted with submitit (docs/design.md §6).

One task per node runs the per-node function the caller hands in (`kimi_core.runtime.ray_slurm.
ray_node_main`): node 0 the head, the others workers. `--kill-on-bad-exit=1` makes a task that
dies end the whole job. Slurm never requeues it (the flow submits a new one). SIGUSR1 goes to the
batch shell `signal_before_deadline_s` before the time limit; its trap touches the run's deadline
mark, which the flow reads at the next rollout boundary. The same submission text is what
`kimi-grpo render --what ray-up` prints (`RaySlurmJobs.script`).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from kimi_core.recipe import Recipe
from slurm.errors import submit_classified
from slurm.executors import slurm_job_state, slurm_parameters
from slurm.from_recipe import job_python, training_job_request
from slurm.requests import SlurmJobRequest

#: States in which a job may still run (or is running); anything else has ended.
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING",
                           "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"})


def ray_job_request(recipe: Recipe, *, run_name: str, output_dir: str | Path) -> SlurmJobRequest:
    """The allocation of the Ray job: every node of the recipe, not requeued, named `<run>-ray`."""
    request = training_job_request(recipe, name=f"{run_name}-ray", output_dir=output_dir)
    return request.model_copy(update={"requeue": False})


def _batch_setup(request: SlurmJobRequest, deadline_mark_prefix: str) -> list[str]:
    """Lines of the batch shell before submitit's `srun`: the recipe env, the deadline trap, and an
    `srun` that runs in the background so the trap fires at once (bash runs a trap only between
    foreground commands, and would otherwise run it when the job ends)."""
    mark = shlex.quote(deadline_mark_prefix) + '"$SLURM_JOB_ID"'
    lines = [f"export {key}={shlex.quote(value)}" for key, value in request.extra_env.items()]
    lines += [
        f"KIMI_GRPO_DEADLINE_MARK={mark}",
        "trap 'echo \"ray job: SIGUSR1, the time limit is near: marking $KIMI_GRPO_DEADLINE_MARK\"; "
        "touch \"$KIMI_GRPO_DEADLINE_MARK\"' USR1",
        'srun() { command srun "$@" & local pid=$!; while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done; '
        'wait "$pid"; }',
    ]
    return lines


@dataclass(frozen=True)
class RaySlurmJobs:
    """Submits a run's Ray job; `folder` holds submitit's files and the job logs (`{run}/slurm`)."""

    request: SlurmJobRequest
    folder: str
    deadline_mark_prefix: str
    python: str

    @classmethod
    def for_run(cls, recipe: Recipe, *, run_name: str, run_dir: Path, deadline_mark_prefix: str,
                python: str | None = None) -> RaySlurmJobs:
        """The Ray job of run `run_name`; every task runs `job_python(recipe, python)` (the interpreter
        running this process, or the container's `python3`)."""
        folder = Path(os.path.abspath(run_dir)) / "slurm"
        return cls(request=ray_job_request(recipe, run_name=run_name, output_dir=folder), folder=str(folder),
                   deadline_mark_prefix=deadline_mark_prefix, python=job_python(recipe, python))

    def executor(self) -> submitit.SlurmExecutor:
        executor = submitit.SlurmExecutor(folder=self.folder, python=shlex.quote(self.python))
        params = slurm_parameters(self.request)
        params.pop("setup", None)  # the environment is exported by `_batch_setup`
        params["srun_args"] = [*params.get("srun_args", []), "--kill-on-bad-exit=1"]
        deadline = self.request.signal_before_deadline_s or 60
        # Overrides submitit's own `--signal=USR2@90` (sent to every task): only the batch shell hears it.
        params["additional_parameters"]["signal"] = f"B:USR1@{deadline}"
        params.pop("signal_delay_s", None)
        params["setup"] = _batch_setup(self.request, self.deadline_mark_prefix)
        executor.update_parameters(**params)
        return executor

    def submit(self, fn: Callable[..., Any], *args: Any) -> str:
        """Submit `fn(*args)` on every node; return the job id. A failed sbatch raises `SbatchRejected`
        (not retried) or `SchedulerBusy` (a transient `ConnectionError`)."""
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        job = submit_classified(self.executor(), fn, *args)  # a refused sbatch: permanent or transient
        return str(job.job_id)

    def script(self) -> str:
        """The sbatch script `submit` hands to Slurm (submitit fills in the job id at run time)."""
        executor = self.executor()
        return executor._make_submission_file_text(executor._submitit_command_str, "%j")

    def log_paths(self, job_id: str) -> list[Path]:
        """The per-task logs of job `job_id` (stdout and stderr of each node's task)."""
        return sorted(Path(self.folder).glob(f"{job_id}_*_log.*"))


@dataclass(frozen=True)
class SlurmQueue:
    """Read and cancel jobs through `squeue`, `sacct` and `scancel` (stateless: safe to pass around)."""

    def state(self, job_id: str) -> str:
        """"PENDING", "RUNNING", ... from `squeue` while the job is queued, else its final `sacct` state;
        "UNKNOWN" when neither knows it (yet)."""
        queued = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                                check=False, timeout=60)
        if queued.returncode == 0 and queued.stdout.strip():
            return queued.stdout.split()[0].upper()
        return slurm_job_state(job_id)

    def reason(self, job_id: str) -> str:
        """Why a pending job waits (`squeue %r`), e.g. "Resources", "Priority"; "" when not pending."""
        result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%r"], capture_output=True, text=True,
                                check=False, timeout=60)
        return result.stdout.strip()

    def in_queue(self, job_id: str) -> bool:
        """True while `squeue` still lists the job (COMPLETING included)."""
        result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True,
                                check=False, timeout=60)
        return result.returncode == 0 and bool(result.stdout.strip())

    def cancel(self, job_ids: Iterable[str]) -> None:
        ids = [str(job_id) for job_id in job_ids]
        if ids:
            subprocess.run(["scancel", *ids], check=False, capture_output=True, text=True, timeout=60)

    def node_list(self, job_id: str) -> str:
        """The job's node list from `sacct` (e.g. "n[1-2]")."""
        result = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "NodeList", "-j", job_id], capture_output=True,
                                text=True, check=False, timeout=60)
        return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
