"""Tests against the real local Slurm cluster (two fake nodes n1, n2 with 8 fake GPUs each).

Start it with tests/slurm/start-local-slurm.sh; without it these tests skip.
"""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import submitit

from slurm.executors import make_executor, sbatch_script, slurm_job_state, submit_or_reattach
from slurm.render import render_conversion_job
from slurm.requests import SlurmJobRequest

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]
T = TypeVar("T")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}

def wait_until(predicate: Callable[[], T], *, timeout_s: float, what: str) -> T:
    """Poll `predicate()` until truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")


def request(tmp_path: Path, *, nodes: int = 1, gpus_per_node: int = 0, cpus: int = 1) -> SlurmJobRequest:
    return SlurmJobRequest(
        job_name=f"kimi-test-{uuid.uuid4().hex[:8]}", nodes=nodes, gpus_per_node=gpus_per_node,
        cpus_per_task=cpus, partition="debug", time_limit="00:10:00", output_dir=str(tmp_path),
    )


def jobs_named(name: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID", "-S", "now-1hour",
                          "--name", name],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


@pytest.mark.timeout(180)
def test_submitit_result_and_reattach(tmp_path: Path) -> None:
    req = request(tmp_path)
    executor = make_executor("slurm", tmp_path, request=req)
    job = submit_or_reattach(executor, operator.add, 2, 3, job_id=None, folder=tmp_path)
    assert job.result() == 5
    wait_until(lambda: slurm_job_state(job.job_id) == "COMPLETED", timeout_s=60,
               what=f"job {job.job_id} COMPLETED in sacct")

    again = submit_or_reattach(executor, operator.add, 2, 3, job_id=job.job_id, folder=tmp_path)
    assert isinstance(again, submitit.SlurmJob)
    assert again.job_id == job.job_id
    assert again.result() == 5
    # sacct's name filter can lag a moment behind its job-id lookup: wait for the record.
    named = wait_until(lambda: jobs_named(req.job_name), timeout_s=30, what="sacct by name")
    assert named == [job.job_id]


@pytest.mark.timeout(180)
def test_job_dying_without_result_raises_and_is_resubmitted(tmp_path: Path) -> None:
    req = request(tmp_path)
    executor = make_executor("slurm", tmp_path, request=req)
    # os._exit skips submitit's result writing: the job dies without a result (exit status 3).
    job = submit_or_reattach(executor, os._exit, 3, job_id=None, folder=tmp_path)
    with pytest.raises((submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError)):
        job.result()
    assert slurm_job_state(job.job_id) not in {"PENDING", "RUNNING", "COMPLETED", "UNKNOWN"}

    retry = submit_or_reattach(executor, operator.add, 1, 1, job_id=job.job_id, folder=tmp_path)
    assert retry.job_id != job.job_id
    assert retry.result() == 2


# A job's output file is shared by every process of the job (the batch shell, each srun step,
# each torchrun rank): their writes interleave, and Python's print writes the text and its "\n"
# in two write() calls when PYTHONUNBUFFERED is set (as .ci/run does), so one process's record
# can end up glued to another's, e.g. `sum=6RANK 2 of 4 on n2 ...`. So the jobs below report
# their results in files of their own (written whole, then renamed into place) and the tests
# read those; the shared output file only serves as a log in failure messages.
REPORT_WRITER = """
def write_report(path, record):
    import json, os
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)
"""


def log_text(path: Path) -> str:
    """The job's shared output file, for failure messages."""
    return path.read_text()[-5000:] if path.exists() else f"(no output file {path})"


ALL_REDUCE = """import os, sys
import torch
import torch.distributed as dist
""" + REPORT_WRITER + """
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
total = torch.tensor([float(rank)])
dist.all_reduce(total)
node = os.environ["SLURMD_NODENAME"]
write_report(os.path.join(sys.argv[1], f"rank-{rank}.json"),
             {"rank": rank, "world": world, "node": node, "sum": total.item()})
print(f"RANK {rank} of {world} on {node} sum={total.item():g}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.timeout(240)
def test_conversion_job_all_reduce_across_two_nodes(tmp_path: Path) -> None:
    req = request(tmp_path, nodes=2, cpus=2)
    (tmp_path / "all_reduce.py").write_text(ALL_REDUCE)
    reports = tmp_path / "ranks"
    reports.mkdir()
    script = tmp_path / "convert.sbatch"
    script.write_text(render_conversion_job(req, nproc_per_node=2, master_port=23456,
                                            command_args=[str(tmp_path / "all_reduce.py"), str(reports)],
                                            python=sys.executable))
    job_id = sbatch_script(script, cwd=tmp_path)
    state = wait_until(lambda: (s := slurm_job_state(job_id)) in TERMINAL and s, timeout_s=180,
                       what=f"job {job_id} to finish")
    output = log_text(tmp_path / f"{req.job_name}-{job_id}.out")
    assert state == "COMPLETED", output
    # One report per rank, in a file of its own (the shared output file interleaves the ranks).
    ranks = {path.name: json.loads(path.read_text()) for path in sorted(reports.iterdir())}
    # 4 ranks 0..3: every rank gets 0 + 1 + 2 + 3 = 6; ranks 0, 1 on n1 and 2, 3 on n2.
    assert ranks == {
        "rank-0.json": {"rank": 0, "world": 4, "node": "n1", "sum": 6.0},
        "rank-1.json": {"rank": 1, "world": 4, "node": "n1", "sum": 6.0},
        "rank-2.json": {"rank": 2, "world": 4, "node": "n2", "sum": 6.0},
        "rank-3.json": {"rank": 3, "world": 4, "node": "n2", "sum": 6.0},
    }, output
