"""A failed sbatch, classified from its stderr: a rejected job (permanent) or a busy scheduler (transient).

submitit's `SlurmExecutor.submit` raises `submitit.core.utils.FailedJobError(stderr)` when sbatch
exits non-zero; `slurm.executors.sbatch_script` sees the stderr itself. Both re-raise as
`SbatchRejected` (retrying resubmits the same invalid request) or `SchedulerBusy` (a
`ConnectionError`, which `kimi_core.runtime.failures.is_transient` retries).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import submitit
from submitit.core.utils import FailedJobError


class SbatchRejected(RuntimeError):
    """Slurm refused the job as asked (partition, account, QOS, node configuration): retrying cannot help."""


class SchedulerBusy(ConnectionError):
    """The Slurm controller did not take the job now (timeout, unreachable, busy): worth retrying."""


#: Lower-case fragments of sbatch stderr that mean the controller could not take the job now.
_TRANSIENT = (
    "unable to contact slurm controller",
    "socket timed out",
    "slurm temporarily unable",
    "job creation temporarily disabled",
    "resource temporarily unavailable",
    "slurm job queue full",
    "zero bytes were transmitted or received",
    "communication connection failure",
    "backup controller in standby mode",
)

#: Lower-case fragments of a rejection, with the recipe key to fix (first match wins).
_HINTS = (
    ("invalid partition", "check cluster.partition (`sinfo -s` lists the partitions)"),
    ("invalid account", "check cluster.account (`sacctmgr show assoc user=$USER` lists yours)"),
    ("invalid qos", "check cluster.qos (`sacctmgr show qos` lists them)"),
    ("requested node configuration is not available",
     "lower cluster.num_nodes, gpus_per_node or cpus_per_task to what the partition's nodes have (`sinfo -N -l`)"),
)
_DEFAULT_HINT = "fix the request the message names (cluster profile or --set cluster.KEY=VALUE)"

_PREFIX_RE = re.compile(r"^(sbatch:\s*)?(error:\s*)?", re.IGNORECASE)
SbatchError = type[SbatchRejected] | type[SchedulerBusy]


def classify_sbatch_error(stderr: str) -> SbatchError:
    """`SchedulerBusy` when sbatch's stderr says the controller could not take the job now, else
    `SbatchRejected` (an invalid partition, account, QOS or node configuration, or anything unknown)."""
    text = stderr.lower()
    return SchedulerBusy if any(fragment in text for fragment in _TRANSIENT) else SbatchRejected


def sbatch_error_line(stderr: str) -> str:
    """The meaningful line of sbatch's stderr, without its `sbatch: error:` prefix: the
    `Batch job submission failed: ...` one, else the last `error:` line, else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for marker in ("submission failed", "error:"):
        marked = [line for line in lines if marker in line.lower()]
        if marked:
            return _PREFIX_RE.sub("", marked[-1])
    return _PREFIX_RE.sub("", lines[-1]) if lines else "(no message)"


def sbatch_error(stderr: str, *, what: str) -> SbatchRejected | SchedulerBusy:
    """The classified exception for a failed sbatch of `what`: its meaningful line and what to do."""
    cls = classify_sbatch_error(stderr)
    line = sbatch_error_line(stderr)
    if cls is SchedulerBusy:
        return SchedulerBusy(f"sbatch {what}: {line}: the Slurm controller is busy or unreachable; retry later "
                             "(`scontrol ping` shows whether it answers)")
    text = line.lower()
    hint = next((fix for fragment, fix in _HINTS if fragment in text), _DEFAULT_HINT)
    return SbatchRejected(f"sbatch {what} rejected: {line}: {hint}")


def submit_classified(executor: submitit.Executor, fn: Callable[..., Any], *args: Any) -> submitit.Job[Any]:
    """`executor.submit(fn, *args)`, a failed sbatch re-raised as `SbatchRejected` or `SchedulerBusy`."""
    try:
        return executor.submit(fn, *args)
    except FailedJobError as err:  # submitit's CommandFunction: the message is sbatch's stderr
        raise sbatch_error(str(err), what=f"of {getattr(fn, '__name__', 'the job')}") from err
