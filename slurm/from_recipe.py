"""Slurm requests derived from a recipe's cluster section (the site profile merged in)."""

from __future__ import annotations

import sys
from pathlib import Path

from kimi_core.recipe import Recipe
from slurm.requests import SlurmJobRequest

#: Time limit of a CPU stage job (data prep, verification) when the profile gives none.
STAGE_TIME_LIMIT = "04:00:00"


def _time(recipe: Recipe, default: str) -> str:
    return recipe.cluster.time_limit or default


def stage_job_request(recipe: Recipe, *, name: str, output_dir: str | Path = ".") -> SlurmJobRequest | None:
    """A one-node CPU job for a job-shaped stage; None when the recipe runs without Slurm."""
    c = recipe.cluster
    if c.executor != "slurm":
        return None
    assert c.partition is not None  # the recipe rules require it for the slurm executor
    return SlurmJobRequest(
        job_name=name, nodes=1, gpus_per_node=0, cpus_per_task=c.cpus_per_task or 1, partition=c.partition,
        time_limit=_time(recipe, STAGE_TIME_LIMIT), output_dir=str(output_dir), account=c.account, qos=c.qos,
        container_image=c.container_image, extra_env=dict(recipe.env),
    )


def training_job_request(recipe: Recipe, *, name: str, output_dir: str | Path = ".") -> SlurmJobRequest:
    """The whole-allocation request of a training run: every node, its GPUs, requeue, deadline signal."""
    c = recipe.cluster
    if c.partition is None:
        raise ValueError("cluster.partition is not set: pass a Slurm cluster profile (--cluster NAME)")
    return SlurmJobRequest(
        job_name=name, nodes=c.num_nodes, gpus_per_node=c.gpus_per_node if c.accelerator == "gpu" else 0,
        cpus_per_task=c.cpus_per_task or 1, partition=c.partition, time_limit=_time(recipe, "48:00:00"),
        output_dir=str(output_dir), account=c.account, qos=c.qos, container_image=c.container_image,
        requeue=True, signal_before_deadline_s=c.signal_before_deadline_s, extra_env=dict(recipe.env),
        exclusive=c.accelerator == "gpu",
    )


def job_python(recipe: Recipe, override: str | None = None) -> str:
    """The interpreter a rendered job runs: `override` when given; `python3` inside the recipe's
    `cluster.container_image` (the container's own); else the interpreter running this process, as
    an absolute path, so the job imports the packages installed beside it (a venv included)."""
    if override:
        return override
    if recipe.cluster.container_image:
        return "python3"
    return sys.executable or "python3"
