"""`sbatch_options` is the one request -> Slurm mapping: the header and submitit agree on it."""

from __future__ import annotations

from typing import Any

from slurm.executors import slurm_parameters
from slurm.render import render_sbatch_header
from slurm.requests import SlurmJobRequest, sbatch_options

FULL = SlurmJobRequest(
    job_name="kimi", nodes=4, gpus_per_node=8, cpus_per_task=96, partition="gpu", time_limit="48:00:59",
    output_dir="/runs/r/slurm/", mem_per_gpu="120G", account="acct", qos="high", container_image="img:1",
    requeue=True, signal_before_deadline_s=600, extra_env={"A": "x y"}, exclusive=True,
)

#: What each sbatch option of FULL is in submitit's terms (`output`: submitit keeps its own logs).
SUBMITIT_OF_OPTION: dict[str, tuple[str, Any] | None] = {
    "job-name": ("job_name", "kimi"),
    "nodes": ("nodes", 4),
    "ntasks-per-node": ("ntasks_per_node", 1),
    "cpus-per-task": ("cpus_per_task", 96),
    "gpus-per-node": ("gpus_per_node", 8),
    "mem-per-gpu": ("mem_per_gpu", "120G"),
    "partition": ("partition", "gpu"),
    "account": ("account", "acct"),
    "qos": ("qos", "high"),
    "time": ("time", 48 * 60),
    "output": None,
    "exclusive": ("exclusive", True),
    "requeue": ("additional_parameters", {"requeue": True}),
    "signal": ("signal_delay_s", 600),
}


def test_header_is_the_options_in_order() -> None:
    header = render_sbatch_header(FULL).splitlines()
    assert header[0] == "#!/bin/bash"
    assert header[1:] == [
        "#SBATCH --job-name=kimi", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=96", "#SBATCH --gpus-per-node=8", "#SBATCH --mem-per-gpu=120G",
        "#SBATCH --partition=gpu", "#SBATCH --account=acct", "#SBATCH --qos=high", "#SBATCH --time=48:00:59",
        "#SBATCH --output=/runs/r/slurm/%x-%j.out", "#SBATCH --exclusive", "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@600",
    ]


def test_header_and_submitit_agree_option_by_option() -> None:
    options = sbatch_options(FULL)
    assert [name for name, _ in options] == list(SUBMITIT_OF_OPTION)
    header = render_sbatch_header(FULL).splitlines()[1:]
    params = slurm_parameters(FULL)
    expected: dict[str, Any] = {"srun_args": ["--container-image=img:1"], "setup": ["export A='x y'"]}
    for (name, value), line in zip(options, header, strict=True):
        assert line == (f"#SBATCH --{name}" if value is None else f"#SBATCH --{name}={value}")
        submitit = SUBMITIT_OF_OPTION[name]
        if submitit is not None:
            key, converted = submitit
            assert params[key] == converted, name
            expected[key] = converted
    assert params == expected


def test_minimal_request_without_requeue() -> None:
    req = SlurmJobRequest(job_name="cpu", nodes=1, gpus_per_node=0, cpus_per_task=2, partition="debug",
                          time_limit="00:00:30", output_dir="o", mem="8G")
    assert sbatch_options(req) == [
        ("job-name", "cpu"), ("nodes", "1"), ("ntasks-per-node", "1"), ("cpus-per-task", "2"), ("mem", "8G"),
        ("partition", "debug"), ("time", "00:00:30"), ("output", "o/%x-%j.out"), ("no-requeue", None),
    ]
    assert slurm_parameters(req) == {
        "job_name": "cpu", "nodes": 1, "ntasks_per_node": 1, "cpus_per_task": 2, "mem": "8G",
        "partition": "debug", "time": 1, "additional_parameters": {"no_requeue": True},
    }
