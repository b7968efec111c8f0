"""submitit executors configured from a `SlurmJobRequest`, with re-attach to earlier jobs."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import submitit

from slurm.errors import sbatch_error, submit_classified
from slurm.requests import SlurmJobRequest, sbatch_options, time_limit_seconds

ExecutorKind = Literal["local", "slurm"]

# Slurm states in which an earlier job is still worth waiting for (or already has its result).
REATTACH_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "COMPLETED"}
)


def make_executor(
    kind: ExecutorKind, folder: str | Path, *, request: SlurmJobRequest | None = None
) -> submitit.Executor:
    """A submitit executor of `kind` writing its files under `folder`.

    "slurm" needs `request` (partition, nodes, GPUs, time limit, account, qos, requeue, signal);
    "local" runs a subprocess on this machine (the time limit is taken from `request` if given).
    """
    if kind == "local":
        local_executor = submitit.LocalExecutor(folder=folder)
        if request is not None:
            local_executor.update_parameters(timeout_min=max(1, request.time_limit_s // 60))
        return local_executor
    if kind != "slurm":
        raise ValueError(f"executor kind {kind!r}: expected one of 'local', 'slurm'")
    if request is None:
        raise ValueError("executor kind 'slurm' needs a SlurmJobRequest (request=...)")
    slurm_executor = submitit.SlurmExecutor(folder=folder)
    slurm_executor.update_parameters(**slurm_parameters(request))
    return slurm_executor


_INT_OPTIONS = frozenset({"nodes", "ntasks-per-node", "cpus-per-task", "gpus-per-node"})
_ADDITIONAL = frozenset({"requeue", "no_requeue"})
"""Options submitit has no parameter for: passed through `additional_parameters`."""


def _submitit_parameter(name: str, value: str | None) -> tuple[str, Any] | None:
    """The submitit parameter for one sbatch option (None: submitit decides it itself)."""
    if name == "output":
        return None  # submitit writes its logs under its own folder
    if name == "time":
        return "time", max(1, time_limit_seconds(str(value)) // 60)
    if name == "signal":
        return "signal_delay_s", int(str(value).rpartition("@")[2])
    key = name.replace("-", "_")
    if value is None:
        return key, True
    return key, int(value) if name in _INT_OPTIONS else value


def slurm_parameters(request: SlurmJobRequest) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for `request`: its `sbatch_options`, translated, plus the
    container (`srun_args`) and environment (`setup`) that a rendered script sets in its body."""
    params: dict[str, Any] = {"additional_parameters": {}}
    for name, value in sbatch_options(request):
        parameter = _submitit_parameter(name, value)
        if parameter is None:
            continue
        key, converted = parameter
        if key in _ADDITIONAL:
            params["additional_parameters"][key] = converted
        else:
            params[key] = converted
    if request.container_image:
        params["srun_args"] = [f"--container-image={request.container_image}"]
    if request.extra_env:
        env = request.extra_env.items()
        params["setup"] = [f"export {key}={shlex.quote(value)}" for key, value in env]
    return params


def slurm_job_state(job_id: str) -> str:
    """The job's state from `sacct` (e.g. "RUNNING", "COMPLETED"); "UNKNOWN" when it has no record."""
    result = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
        capture_output=True, text=True, check=False,
    )
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        return "UNKNOWN"
    return lines[-1].split()[0].upper()  # "CANCELLED by 0" -> "CANCELLED"


def submit_or_reattach(
    executor: submitit.Executor,
    fn: Callable[..., Any],
    *args: Any,
    job_id: str | None,
    folder: str | Path,
) -> submitit.Job[Any]:
    """Submit `fn(*args)`, or re-attach to `job_id` from an earlier attempt when that is still useful.

    Slurm: a job that is pending, running or completed (per `sacct`) is re-attached with
    `submitit.SlurmJob(folder, job_id)`; failed, cancelled, timed-out or unknown jobs are
    submitted again. Local: a job whose result file exists is re-attached (a still-running
    local process cannot be waited on from another process, so it is submitted again). A failed
    sbatch raises `slurm.errors.SbatchRejected` or `SchedulerBusy`.
    """
    if job_id is not None:
        if isinstance(executor, submitit.SlurmExecutor) and slurm_job_state(job_id) in REATTACH_STATES:
            return submitit.SlurmJob(folder=folder, job_id=job_id)
        if isinstance(executor, submitit.LocalExecutor):
            job: submitit.LocalJob[Any] = submitit.LocalJob(folder=folder, job_id=job_id)
            if job.paths.result_pickle.exists():
                return job
    return submit_classified(executor, fn, *args)


def cancel_jobs(job_ids: Iterable[str]) -> None:
    """`scancel` the given Slurm jobs (ids of finished jobs are ignored by Slurm)."""
    ids = [str(job_id) for job_id in job_ids]
    if ids:
        subprocess.run(["scancel", *ids], check=True, capture_output=True, text=True)


def sbatch_script(script: str | Path, *, cwd: str | Path) -> str:
    """Submit an sbatch script file (relative paths inside it resolve from `cwd`); the job id.

    A failed sbatch raises `slurm.errors.SbatchRejected` (permanent) or `SchedulerBusy` (transient).
    """
    result = subprocess.run(["sbatch", "--parsable", str(script)], cwd=cwd, capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise sbatch_error(result.stderr, what=str(script))
    return result.stdout.strip().split(";")[0]
