"""Checks that the Slurm cluster a recipe names can take its jobs, run before anything is submitted.

`check_slurm` asks the scheduler (`sinfo`, bounded by a short timeout) whether the commands the
pipeline uses are on PATH, the controller answers, and `cluster.partition` exists, is up and has
`cluster.num_nodes` nodes. Without these, sbatch would fail late or, for too many nodes, accept a
job that pends forever (reason `PartitionConfig`).
"""

from __future__ import annotations

import shutil
import subprocess

from kimi_core.recipe import Recipe

#: The Slurm commands the pipeline runs on the submitting machine.
SLURM_COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "sinfo")
#: How long one `sinfo` may take before the controller counts as not answering.
SINFO_TIMEOUT_S = 15.0


class SlurmUnavailable(RuntimeError):
    """The Slurm cluster cannot take this recipe's jobs; the message names the key or command and the fix."""


def check_slurm(recipe: Recipe) -> None:
    """Raise `SlurmUnavailable` unless Slurm can take the jobs of `recipe` (a Slurm profile)."""
    _require_commands()
    partition = recipe.cluster.partition
    if not partition:
        raise SlurmUnavailable("cluster.partition is not set: name the partition in the cluster profile "
                               "or pass --set cluster.partition=NAME")
    _require_partition(partition)
    _require_nodes(partition, recipe.cluster.num_nodes)


def _require_commands() -> None:
    missing = [name for name in SLURM_COMMANDS if shutil.which(name) is None]
    if missing:
        raise SlurmUnavailable(f"{', '.join(missing)} not found on PATH (cluster.executor=slurm): run on a Slurm "
                               "login node or add Slurm's bin directory to PATH")


def _sinfo(*args: str) -> list[str]:
    """Non-empty output lines of `sinfo -h ARGS`; `SlurmUnavailable` when the controller does not answer."""
    command = ["sinfo", "-h", *args]
    shown = " ".join(command)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=SINFO_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"`{shown}` did not answer within {SINFO_TIMEOUT_S:.0f} s: the Slurm controller is "
                               "unreachable; check `scontrol ping` and SLURM_CONF") from None
    if result.returncode != 0:
        reason = _last_line(result.stderr) or f"exit status {result.returncode}"
        raise SlurmUnavailable(f"`{shown}` failed ({reason}): the Slurm controller is unreachable; check "
                               "`scontrol ping` and SLURM_CONF")
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _require_partition(partition: str) -> None:
    known = sorted(set(_sinfo("-o", "%R")))
    if partition not in known:
        raise SlurmUnavailable(f"cluster.partition={partition!r} is not a partition of this cluster (known: "
                               f"{', '.join(known) or 'none'}): set one with --set cluster.partition=NAME or in "
                               "the cluster profile")
    states = set(_sinfo("-p", partition, "-o", "%a"))
    if states != {"up"}:
        raise SlurmUnavailable(f"cluster.partition={partition!r} is not up (sinfo availability: "
                               f"{', '.join(sorted(states))}): wait until it is up or choose another with "
                               "--set cluster.partition=NAME")


def _require_nodes(partition: str, num_nodes: int) -> None:
    total = sum(int(count) for count in _sinfo("-p", partition, "-o", "%D"))
    if num_nodes > total:
        raise SlurmUnavailable(f"cluster.num_nodes={num_nodes} but partition {partition!r} has {total} nodes: "
                               f"lower cluster.num_nodes to at most {total} or choose a larger partition")
