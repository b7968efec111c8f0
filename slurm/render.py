"""Pure functions that render sbatch scripts from typed requests (golden-tested).

The script bodies live in `slurm/templates/*.sh` with `{{name}}` placeholders; every
placeholder must be filled and every value used, so a template and its renderer cannot drift
apart silently.
"""

from __future__ import annotations

import re
import shlex
from importlib import resources

from kimi_core.exit_codes import REQUEUE_EXIT
from slurm.requests import SlurmJobRequest, sbatch_options

_PLACEHOLDER_RE = re.compile(r"\{\{([a-z_]+)\}\}")


def fill_template(name: str, values: dict[str, str]) -> str:
    """Replace every `{{key}}` of template `name`; ValueError on a missing or an unused key."""
    text = resources.files("slurm").joinpath("templates", name).read_text()
    wanted = set(_PLACEHOLDER_RE.findall(text))
    missing, unused = wanted - values.keys(), values.keys() - wanted
    if missing or unused:
        raise ValueError(f"template {name}: missing values {sorted(missing)}, unused {sorted(unused)}")
    return _PLACEHOLDER_RE.sub(lambda match: values[match.group(1)], text)


def render_sbatch_header(req: SlurmJobRequest) -> str:
    """The `#SBATCH` lines of a one-task-per-node job (`slurm.requests.sbatch_options`), ending with a newline."""
    lines = [f"#SBATCH --{name}" if value is None else f"#SBATCH --{name}={value}"
             for name, value in sbatch_options(req)]
    return "\n".join(["#!/bin/bash", *lines]) + "\n"


def _export_lines(env: dict[str, str]) -> str:
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())


def _container_args(req: SlurmJobRequest) -> str:
    # The request validated the image name to shell-safe characters ('#' only starts a comment
    # at the beginning of a word).
    return f" --container-image={req.container_image}" if req.container_image else ""


def render_conversion_job(
    req: SlurmJobRequest,
    *,
    nproc_per_node: int,
    master_port: int,
    command_args: list[str],
    python: str = "python3",
) -> str:
    """An sbatch script running `torchrun` on every node: one `srun` task per node.

    Each task execs `python -m torch.distributed.run --nnodes=$SLURM_NNODES
    --node-rank=$SLURM_NODEID --nproc-per-node=N --master-addr=<first node> --master-port=P
    <command_args...>`; world size = nodes * nproc_per_node.
    """
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node={nproc_per_node}: must be >= 1")
    if not 1024 <= master_port < 32768:
        raise ValueError(f"master_port={master_port}: use a port in 1024..32767 (below the ephemeral range)")
    if not command_args:
        raise ValueError("command_args is empty: give a script path or '-m', 'module', then its arguments")
    if req.signal_before_deadline_s is not None:
        raise ValueError(
            "signal_before_deadline_s is not supported for conversion jobs: they are rerun from "
            "the start, so leave it unset"
        )
    env = _export_lines(req.extra_env)
    body = fill_template("conversion.sh", {
        "extra_env": env + "\n" if env else "",
        "python": shlex.quote(python),
        "master_port": str(master_port),
        "nproc_per_node": str(nproc_per_node),
        "container_args": _container_args(req),
        "command_args": " ".join(shlex.quote(arg) for arg in command_args),
    })
    return render_sbatch_header(req) + body


_GPU_ENGINE_NOTE = (
    "# NOTE: the Megatron + SGLang engine this GPU recipe needs is not implemented yet: the data and\n"
    "# checkpoint stages run, then the engine session stops with NotImplementedError (see\n"
    "# kimi_core.engines.make_engine). The script is rendered faithfully from the recipe.\n"
)


def fallback_driver_args(
    *, recipe_path: str, run_name: str, base_dir: str, cluster_profile: str | None, overrides: list[str],
    num_rollout: int | None = None,
) -> list[str]:
    """Arguments of `python -m kimi_core.runtime.fallback` for one run (unquoted)."""
    args = [recipe_path, "--run-name", run_name, "--base-dir", base_dir]
    args += ["--cluster", cluster_profile] if cluster_profile else []
    args += ["--num-rollout", str(num_rollout)] if num_rollout is not None else []
    for assignment in overrides:
        args += ["--set", assignment]
    return args


def render_pipeline_sbatch(
    req: SlurmJobRequest,
    *,
    recipe_path: str,
    run_name: str,
    base_dir: str,
    cluster_profile: str | None,
    overrides: list[str],
    python: str = "python3",
    workdir: str | None = None,
    num_rollout: int | None = None,
) -> str:
    """An sbatch script running the whole pipeline with the fallback driver, requeued on preemption.

    The batch shell exports `req.extra_env` and `KIMI_GRPO_BASE_DIR=base_dir`, sets
    `NCCL_NVLS_ENABLE` to 1 only where `nvidia-smi topo -m` shows NVLink (unless already set),
    starts `python -m kimi_core.runtime.fallback RECIPE --run-name ... --base-dir ...
    [--cluster P] [--set k=v ...]` in the background (through `srun --container-image` when the
    request names an image), forwards SIGUSR1/SIGTERM to it as SIGUSR1 and waits until it really
    exits. Exit `kimi_core.exit_codes.REQUEUE_EXIT` (saved for a requeue) -> `scontrol requeue $SLURM_JOB_ID`, exit 0; otherwise the
    driver's status. `workdir` None = the submission directory (sbatch's default).
    """
    if not req.requeue:
        raise ValueError("the pipeline job resumes through a requeue: build the request with requeue=True")
    if not recipe_path.strip() or not base_dir.strip():
        raise ValueError("recipe_path and base_dir must be non-empty")
    args = fallback_driver_args(recipe_path=recipe_path, run_name=run_name, base_dir=base_dir,
                                cluster_profile=cluster_profile, overrides=overrides, num_rollout=num_rollout)
    launcher = ""
    if req.container_image:
        launcher = f"srun --nodes=1 --ntasks=1{_container_args(req)} "
    if workdir is None:
        cd_line = "# Working directory: the submission directory (sbatch's default).\n"
    else:
        cd_line = f"cd {shlex.quote(workdir)} || exit 1\n"
    body = fill_template("pipeline.sh", {
        "engine_note": _GPU_ENGINE_NOTE if req.gpus_per_node else "",
        "extra_env": _export_lines(req.extra_env),
        "base_dir": shlex.quote(base_dir),
        "workdir": cd_line,
        "python": shlex.quote(python),
        "driver_args": " ".join(shlex.quote(arg) for arg in args),
        "launcher": launcher,
        "requeue_exit": str(REQUEUE_EXIT),
    })
    return render_sbatch_header(req) + body
