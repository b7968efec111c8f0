"""Ray on Slurm without Slurm: the port layout, the readiness wait, loss detection and the rule that
decides between re-attaching to the run's Ray job and submitting a new one.

`ScriptedQueue` stands in for Slurm's queue (`slurm.ray_job.SlurmQueue`, which runs squeue/sacct/
scancel) and `RecordingSubmitter` for the submitit submission: a stand-in, named as such, for the
decisions only. The real job, queue and Ray Client are tested in `tests/slurm/test_ray_on_slurm.py`.
"""

from __future__ import annotations

import json
import platform
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import ray

from kimi_core.recipe import RecipeError, load_recipe
from kimi_core.recipe.sections import RaySection
from kimi_core.runtime import flow_steps
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.failures import PermanentFailure, SessionLost
from kimi_core.runtime.ledger import RunLedger
from kimi_core.runtime.ray_slurm import (
    JobWatch,
    RayFiles,
    busy_ports,
    check_versions,
    pinned_ports,
    token_env,
    wait_for_free_ports,
    wait_ready,
)

REPO = Path(__file__).resolve().parents[2]


class ScriptedQueue:
    """Slurm's queue as a script of states per job (the last state repeats); records cancels."""

    def __init__(self, states: dict[str, list[str]]):
        self.states = {job: list(seq) for job, seq in states.items()}
        self.cancelled: list[str] = []

    def state(self, job_id: str) -> str:
        seq = self.states.get(job_id, ["UNKNOWN"])
        return seq.pop(0) if len(seq) > 1 else seq[0]

    def reason(self, job_id: str) -> str:
        return "Resources"

    def in_queue(self, job_id: str) -> bool:
        return job_id not in self.cancelled and self.states.get(job_id, ["COMPLETED"])[0] in ("PENDING", "RUNNING")

    def cancel(self, job_ids: Iterable[str]) -> None:
        self.cancelled += list(job_ids)


class RecordingSubmitter:
    """Records submissions; each one's job announces readiness at once (writes its readiness file)."""

    def __init__(self, files: RayFiles, queue: ScriptedQueue, first_id: int = 100):
        self.files, self.queue, self.next_id = files, queue, first_id
        self.submitted: list[str] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> str:
        job = str(self.next_id)
        self.next_id += 1
        self.submitted.append(job)
        self.queue.states[job] = ["PENDING", "RUNNING"]
        write_ready(self.files, job)
        return job

    def log_paths(self, job_id: str) -> list[Path]:
        return []


def write_ready(files: RayFiles, job: str, **extra: Any) -> None:
    files.directory.mkdir(parents=True, exist_ok=True)
    record = {"job_id": job, "address": f"ray://10.0.0.1:10001#{job}", "nodes": ["n1", "n2"],
              "resources": {"CPU": 2, "GPU": 0}, "ray_version": ray.__version__,
              "python_version": platform.python_version(), **extra}
    files.ready(job).write_text(json.dumps(record))


# ---- ports ----------------------------------------------------------------------------------
def test_default_and_test_cluster_layouts_are_valid() -> None:
    assert RaySection().layout_problems(32) == []
    recipe = load_recipe(REPO / "configs/local.yaml", overrides=["cluster.num_nodes=2"], cluster="localhost-slurm",
                         base_dir="/tmp/x")
    assert recipe.cluster.ray.node_ports(1)["node_manager"] == recipe.cluster.ray.node_port_base + 1000


@pytest.mark.parametrize(("fields", "nodes", "message"), [
    ({"node_port_stride": 3}, 2, "share port"),  # node 1's node manager lands on node 0's agent port
    ({"node_port_stride": 26000}, 2, "ephemeral range"),
    ({"gcs_port": 21000}, 1, "worker ports of loopback Ray heads"),
    ({"min_worker_port": 12000, "max_worker_port": 11000}, 1, "min_worker_port"),
    ({"client_port": 10500}, 1, "share port"),  # inside the worker range
])
def test_port_layout_problems_are_named(fields: dict[str, int], nodes: int, message: str) -> None:
    problems = RaySection(**fields).layout_problems(nodes)
    assert problems and message in problems[0], problems


def test_a_bad_layout_fails_at_load_naming_the_section() -> None:
    with pytest.raises(RecipeError, match=r"cluster\.ray"):
        load_recipe(REPO / "configs/local.yaml", cluster="localhost-slurm", base_dir="/tmp/x",
                    overrides=["cluster.ray.gcs_port=25000"])


# ---- readiness, loss, versions ----------------------------------------------------------------
def test_wait_ready_waits_through_pending_and_returns_the_announced_address(tmp_path: Path) -> None:
    files = RayFiles.of(tmp_path)
    queue = ScriptedQueue({"7": ["PENDING", "PENDING", "RUNNING", "RUNNING"]})
    naps: list[float] = []

    def nap(seconds: float) -> None:  # the job announces itself after two looks at RUNNING
        naps.append(seconds)
        if len(naps) == 3:
            write_ready(files, "7")

    ready = wait_ready(files, "7", queue=queue, submitter=RecordingSubmitter(files, queue), ray=RaySection(),
                       sleep=nap)
    assert ready.job_id == "7" and ready.address == "ray://10.0.0.1:10001#7"
    assert queue.cancelled == []


def test_wait_ready_fails_when_the_job_ends_or_never_gets_ready(tmp_path: Path) -> None:
    files = RayFiles.of(tmp_path)
    queue = ScriptedQueue({"8": ["PENDING", "FAILED"]})
    with pytest.raises(SessionLost, match="Ray job 8 ended before it was ready: FAILED"):
        wait_ready(files, "8", queue=queue, submitter=RecordingSubmitter(files, queue), ray=RaySection(),
                   sleep=lambda s: None)
    queue = ScriptedQueue({"9": ["RUNNING"]})
    with pytest.raises(SessionLost, match="not ready within cluster.ray.readiness_timeout_s = 1 s"):
        wait_ready(files, "9", queue=queue, submitter=RecordingSubmitter(files, queue),
                   ray=RaySection(readiness_timeout_s=1), sleep=lambda s: __import__("time").sleep(0.3))
    assert queue.cancelled == ["9"]


def test_job_watch_turns_an_ended_job_into_a_lost_session() -> None:
    queue = ScriptedQueue({"5": ["RUNNING", "UNKNOWN", "CANCELLED"]})
    watch = JobWatch(queue, "5")
    watch()  # running
    watch()  # sacct not caught up yet: undecided
    with pytest.raises(SessionLost, match="Ray job 5 ended: CANCELLED"):
        watch()


def test_version_mismatch_is_permanent_and_names_both() -> None:
    with pytest.raises(PermanentFailure, match=r"runs Ray 9\.9\.9 on Python 3\.99, this process Ray"):
        check_versions({"job_id": "3", "ray_version": "9.9.9", "python_version": "3.99.0"})
    check_versions({"job_id": "3", "ray_version": ray.__version__, "python_version": platform.python_version()})


def test_token_file_modes_and_environment(tmp_path: Path) -> None:
    files = RayFiles.of(tmp_path / "run")
    token = files.ensure_token()
    assert oct(files.directory.stat().st_mode & 0o777) == "0o700" and oct(token.stat().st_mode & 0o777) == "0o600"
    first = token.read_text()
    assert files.ensure_token().read_text() == first and len(first) == 64  # made once per run
    env = token_env(token)
    assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)} and first not in str(env)
    assert token_env(None) == {"RAY_AUTH_MODE": "disabled"}


# ---- re-attach or submit anew -----------------------------------------------------------------
@pytest.fixture()
def slurm_run(tmp_path: Path) -> tuple[RunContext, RayFiles]:
    ctx = RunContext(recipe_path=str(REPO / "configs/local.yaml"), run_name="rule", cluster="localhost-slurm",
                     overrides=("cluster.num_nodes=2",), base_dir=str(tmp_path))
    ledger = RunLedger(ctx)
    return ctx, RayFiles.of(ledger.paths.run_dir)


def test_bring_up_submits_then_reattaches_while_the_job_runs(slurm_run: tuple[RunContext, RayFiles]) -> None:
    ctx, files = slurm_run
    queue = ScriptedQueue({})
    submitter = RecordingSubmitter(files, queue)
    first = flow_steps.bring_up_cluster(ctx, submitter=submitter, queue=queue)
    assert submitter.submitted == ["100"] and first.job_id == "100" and first.address.endswith("#100")
    assert RunLedger(ctx).manifest.ray_jobs == ["100"]
    again = flow_steps.bring_up_cluster(ctx, submitter=submitter, queue=queue)  # a rerun after a crashed flow
    assert again == first and submitter.submitted == ["100"] and queue.cancelled == []


@pytest.mark.parametrize("why", ["ended", "deadline", "not ready"])
def test_bring_up_replaces_a_job_that_ended_is_at_its_deadline_or_never_got_ready(
        slurm_run: tuple[RunContext, RayFiles], why: str) -> None:
    ctx, files = slurm_run
    queue = ScriptedQueue({})
    submitter = RecordingSubmitter(files, queue)
    flow_steps.bring_up_cluster(ctx, submitter=submitter, queue=queue)
    if why == "ended":
        queue.states["100"] = ["CANCELLED"]
    elif why == "deadline":
        files.deadline("100").touch()
    else:
        files.ready("100").unlink()
    second = flow_steps.bring_up_cluster(ctx, submitter=submitter, queue=queue)
    assert submitter.submitted == ["100", "101"] and second.job_id == "101"
    assert second.address.endswith("#101")  # the new job's address, connected anew (`LIVE.connect` keys by job)
    assert queue.cancelled == ([] if why == "ended" else ["100"])  # a live old job is cancelled first
    assert RunLedger(ctx).manifest.ray_jobs == ["100", "101"]


def test_a_node_waits_for_its_pinned_ports_to_come_free() -> None:
    """A daemon of the run's previous Ray job still listening on a pinned port: the node waits for it
    (the next job's raylet otherwise dies with "Address already in use"), and names it if it stays."""
    ray_section = RaySection()
    head = pinned_ports(ray_section, 0)
    assert {ray_section.gcs_port, ray_section.client_port, ray_section.dashboard_port} <= set(head)
    assert ray_section.gcs_port not in pinned_ports(ray_section, 1)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    assert busy_ports([port]) == [port]
    with pytest.raises(RuntimeError, match=rf"ports \[{port}\] on n1 are still in use after 1 s"):
        wait_for_free_ports([port], node="n1", timeout_s=1)
    threading.Timer(1.0, listener.close).start()
    wait_for_free_ports([port], node="n1", timeout_s=30)
    assert busy_ports([port]) == []
