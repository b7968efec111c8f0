"""Typed requests for Slurm jobs (validated when built)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_TIME_RE = re.compile(r"^\d+:[0-5]\d:[0-5]\d$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/#@+-]*$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SlurmJobRequest(_Frozen):
    """One Slurm allocation: what `#SBATCH` lines and submitit parameters are rendered from."""

    job_name: str
    """Slurm job name (`--job-name`); letters, digits, `_`, `.`, `-`."""
    nodes: int = Field(ge=1)
    """Number of nodes (`--nodes`)."""
    gpus_per_node: int = Field(ge=0)
    """GPUs per node (`--gpus-per-node`); 0 for CPU-only jobs."""
    cpus_per_task: int = Field(ge=1)
    """CPUs per task; the rendered scripts run one task per node, so this is CPUs per node."""
    partition: str
    """Partition (`--partition`)."""
    time_limit: str
    """Wall-clock limit "HH:MM:SS" (hours may exceed 24, e.g. "48:00:00")."""
    output_dir: str
    """Directory of the job's stdout/stderr file (`%x-%j.out` inside it)."""
    mem: str | None = None
    """Memory per node (`--mem`), e.g. "200G"; exclusive with mem_per_gpu."""
    mem_per_gpu: str | None = None
    """Memory per GPU (`--mem-per-gpu`), e.g. "120G"; exclusive with mem."""
    account: str | None = None
    """Account to charge (`--account`)."""
    qos: str | None = None
    """Quality of service (`--qos`)."""
    container_image: str | None = None
    """Container image for every `srun` step (pyxis `--container-image`); None runs on the host."""
    requeue: bool = False
    """Let Slurm requeue the job after preemption or node failure (`--requeue`)."""
    signal_before_deadline_s: int | None = Field(default=None, ge=1)
    """Send SIGUSR1 to the batch shell this many seconds before the time limit."""
    extra_env: dict[str, str] = Field(default_factory=dict)
    """Environment variables exported at the top of the script."""
    exclusive: bool = False
    """Whole nodes only (`--exclusive`)."""

    @field_validator("job_name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"job_name {value!r}: use letters, digits, '_', '.', '-'")
        return value

    @field_validator("time_limit")
    @classmethod
    def _check_time(cls, value: str) -> str:
        if not _TIME_RE.match(value):
            raise ValueError(f"time_limit {value!r}: expected HH:MM:SS, e.g. '48:00:00'")
        return value

    @field_validator("container_image")
    @classmethod
    def _check_image(cls, value: str | None) -> str | None:
        if value is not None and not _IMAGE_RE.match(value):
            raise ValueError(f"container_image {value!r}: letters, digits and ._:/#@+- only")
        return value

    @field_validator("mem", "mem_per_gpu")
    @classmethod
    def _check_mem(cls, value: str | None) -> str | None:
        if value is not None and not _MEM_RE.match(value):
            raise ValueError(f"memory {value!r}: expected a number with an optional K/M/G/T suffix")
        return value

    @field_validator("extra_env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [key for key in value if not _ENV_KEY_RE.match(key)]
        if bad:
            raise ValueError(f"extra_env: invalid variable names {bad}")
        return value

    @model_validator(mode="after")
    def _check_cross_fields(self) -> SlurmJobRequest:
        if self.mem is not None and self.mem_per_gpu is not None:
            raise ValueError("set only one of mem and mem_per_gpu")
        if self.mem_per_gpu is not None and self.gpus_per_node == 0:
            raise ValueError("mem_per_gpu needs gpus_per_node > 0; use mem for CPU jobs")
        if self.signal_before_deadline_s is not None:
            if self.signal_before_deadline_s >= self.time_limit_s:
                raise ValueError(
                    f"signal_before_deadline_s={self.signal_before_deadline_s} must be shorter "
                    f"than time_limit={self.time_limit}"
                )
        return self

    @property
    def time_limit_s(self) -> int:
        """The time limit in seconds."""
        return time_limit_seconds(self.time_limit)


def time_limit_seconds(time_limit: str) -> int:
    """Seconds of a Slurm time limit "HH:MM:SS" (hours may exceed 24)."""
    hours, minutes, seconds = (int(part) for part in time_limit.split(":"))
    return hours * 3600 + minutes * 60 + seconds


SbatchOption = tuple[str, str | None]
"""`(option, value)` of one sbatch option, the option without its leading `--`; value None for a flag."""


def sbatch_options(req: SlurmJobRequest) -> list[SbatchOption]:
    """The sbatch options of a one-task-per-node job for `req`, in `#SBATCH` header order.

    The single mapping from a request to Slurm options: `slurm.render.render_sbatch_header`
    writes these as `#SBATCH` lines and `slurm.executors.slurm_parameters` translates them into
    submitit parameters. SIGUSR1 goes to the batch shell (`B:`) `signal_before_deadline_s`
    seconds before the time limit.
    """
    options: list[SbatchOption] = [
        ("job-name", req.job_name),
        ("nodes", str(req.nodes)),
        ("ntasks-per-node", "1"),
        ("cpus-per-task", str(req.cpus_per_task)),
    ]
    if req.gpus_per_node:
        options.append(("gpus-per-node", str(req.gpus_per_node)))
    if req.mem is not None:
        options.append(("mem", req.mem))
    if req.mem_per_gpu is not None:
        options.append(("mem-per-gpu", req.mem_per_gpu))
    options.append(("partition", req.partition))
    if req.account:
        options.append(("account", req.account))
    if req.qos:
        options.append(("qos", req.qos))
    options.append(("time", req.time_limit))
    options.append(("output", f"{req.output_dir.rstrip('/')}/%x-%j.out"))
    if req.exclusive:
        options.append(("exclusive", None))
    options.append(("requeue", None) if req.requeue else ("no-requeue", None))
    if req.signal_before_deadline_s is not None:
        options.append(("signal", f"B:USR1@{req.signal_before_deadline_s}"))
    return options
