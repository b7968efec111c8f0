"""Ray on a Slurm allocation: the job's side (one task per node) and the flow's side (docs/design.md §6).

The job (`ray_node_main`, submitted by `slurm.ray_job.RaySlurmJobs`): every task starts a Ray node
(`ray start --block`) bound to its node's IP with the pinned ports of `cluster.ray`, under the lease
watchdog (`ray_lease`: the node ends itself when the flow stops touching `{run}/ray/lease` for
`cluster.ray.lease_s`). The task on node 0 starts the head, waits until every node has registered
with its CPUs/GPUs and a zero-CPU task on each node has imported the project, then writes
`{run}/ray/cluster-<job>.json` atomically; the file goes when the job ends.

The flow (`bring_up`): reuse the recorded job while Slurm says RUNNING and it is ready; otherwise
cancel it, wait until it has left the queue (one writer per run directory), submit a new one and
wait: PENDING without limit (the Slurm reason every minute), RUNNING at most
`cluster.ray.readiness_timeout_s`. Slurm is the source of truth: a job that is no longer RUNNING
is a lost session (`JobWatch`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kimi_core.atomic import write_text_atomic
from kimi_core.recipe import Recipe
from kimi_core.recipe.sections import RaySection
from kimi_core.runtime.failures import PermanentFailure, SessionLost
from kimi_core.runtime.progress import console
from kimi_core.runtime.ray_lease import watchdog_command
from kimi_core.runtime.ray_local import can_bind

#: Seconds between looks at the job while waiting for it.
POLL_S = 2.0
#: Seconds between the Slurm reason lines of a pending job.
PENDING_REPORT_S = 60.0
#: Seconds a cancelled job may take to leave the queue before bring-up gives up.
LEAVE_QUEUE_S = 300.0
#: Ray's unix socket paths must stay under ~107 bytes: `<temp dir>/session_<stamp>_<pid>/sockets/...`.
MAX_TEMP_DIR = 40
#: Custom resource every node carries, `slurm_node_<nodename>: 1` (placement and readiness).
NODE_RESOURCE_PREFIX = "slurm_node_"


# ---- the run's Ray files ---------------------------------------------------------------------
@dataclass(frozen=True)
class RayFiles:
    """`{run}/ray/`: the lease, the token, and per job the readiness file and the deadline mark."""

    directory: Path

    @classmethod
    def of(cls, run_dir: Path) -> RayFiles:
        return cls(Path(os.path.abspath(run_dir)) / "ray")

    @property
    def lease(self) -> Path:
        return self.directory / "lease"

    @property
    def token(self) -> Path:
        return self.directory / "auth_token"

    @property
    def deadline_prefix(self) -> str:
        return str(self.directory / "deadline-")

    def ready(self, job_id: str) -> Path:
        return self.directory / f"cluster-{job_id}.json"

    def deadline(self, job_id: str) -> Path:
        return Path(self.deadline_prefix + job_id)

    def ensure_token(self) -> Path:
        """The run's Ray auth token file (created once: directory 0700, file 0600)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        if not self.token.exists():
            fd = os.open(self.token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        return self.token


def token_env(token_path: Path | str | None) -> dict[str, str]:
    """Environment of Ray processes and drivers for token auth (`token_path` None: auth off).

    Ray 2.60 reads the token from `RAY_AUTH_TOKEN_PATH` when `RAY_AUTH_MODE=token`; the token itself
    never goes into an environment variable, a command line or a log."""
    if token_path is None:
        return {"RAY_AUTH_MODE": "disabled"}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": os.path.abspath(token_path)}


def use_token(token_path: Path | str | None) -> None:
    """Make this process (a driver about to connect) use the token auth of `token_env(token_path)`.

    Ray reads `RAY_AUTH_MODE` into its cached config when it is imported, so after setting the
    variables the config and the token cache are reloaded (as Ray's own `_enable_token_auth` does in
    `ray/_private/authentication/authentication_token_setup.py`, Ray 2.60)."""
    os.environ.update(token_env(token_path))
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # noqa: PLC0415 - drivers only

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


# ---- the job's side --------------------------------------------------------------------------
@dataclass(frozen=True)
class RayNodeSpec:
    """What every task of the Ray job needs (pickled by submitit; paths absolute)."""

    run_dir: str
    ray: RaySection
    cpus_per_node: int
    gpus_per_node: int
    token: bool
    project_module: str = "kimi_core"

    @classmethod
    def for_recipe(cls, recipe: Recipe, run_dir: Path) -> RayNodeSpec:
        c = recipe.cluster
        return cls(run_dir=os.path.abspath(run_dir), ray=c.ray, cpus_per_node=c.cpus_per_task or 1,
                   gpus_per_node=c.gpus_per_node if c.accelerator == "gpu" else 0,
                   token=c.num_nodes > 1 or c.accelerator == "gpu")


def _ray_start(spec: RayNodeSpec, *, index: int, node: str, ip: str, temp_dir: str, head_ip: str) -> list[str]:
    ports = spec.ray.node_ports(index)
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
        f"--node-ip-address={ip}", f"--temp-dir={temp_dir}",
        f"--num-cpus={spec.cpus_per_node}", f"--num-gpus={spec.gpus_per_node}",
        f"--resources={json.dumps({NODE_RESOURCE_PREFIX + node: 1})}",
        f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
        f"--metrics-export-port={ports['metrics_export']}",
        f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
        f"--runtime-env-agent-port={ports['runtime_env_agent']}",
        f"--min-worker-port={ports['min_worker']}", f"--max-worker-port={ports['max_worker']}",
    ]
    if index == 0:
        return [*command, "--head", f"--port={spec.ray.gcs_port}", f"--dashboard-host={ip}",
                f"--dashboard-port={spec.ray.dashboard_port}", f"--ray-client-server-port={spec.ray.client_port}"]
    return [*command, f"--address={head_ip}:{spec.ray.gcs_port}"]


#: How long a node waits for its pinned ports to come free before starting Ray (at most half the
#: readiness timeout).
PORT_WAIT_S = 120.0


def pinned_ports(ray: RaySection, index: int) -> list[int]:
    """The fixed ports Ray binds on node `index` (the head's own ports too on node 0); not the worker range."""
    ports = {k: v for k, v in ray.node_ports(index).items() if k not in ("min_worker", "max_worker")}
    return sorted({*ports.values(), *(ray.head_ports().values() if index == 0 else ())})


def busy_ports(ports: Iterable[int]) -> list[int]:
    """The ports among `ports` that a socket cannot bind on all interfaces right now (Ray's daemons
    bind 0.0.0.0 or the node's IP; either conflicts with a wildcard bind)."""
    return [port for port in ports if not can_bind(port, "0.0.0.0", reuse_address=True)]


def wait_for_free_ports(ports: list[int], *, node: str, timeout_s: float) -> None:
    """Wait until this node's pinned ports are free. A cancelled Ray job leaves Slurm's queue when its
    tasks end, while daemons it started may still be exiting: a raylet of the run's previous job on
    the same ports made the next job's head fail ("Address already in use") in the test cluster."""
    deadline = time.monotonic() + timeout_s
    busy = busy_ports(ports)
    if busy:
        print(f"ray node on {node}: ports {busy} are still in use (a previous Ray job ending?); waiting up to "
              f"{timeout_s:.0f} s", flush=True)
    while busy:
        if time.monotonic() > deadline:
            raise RuntimeError(f"ports {busy} on {node} are still in use after {timeout_s:.0f} s: another process "
                               "holds them; stop it, or move the ports of cluster.ray")
        time.sleep(0.5)
        busy = busy_ports(ports)


def node_environment(spec: RayNodeSpec) -> dict[str, str]:
    files = RayFiles.of(Path(spec.run_dir))
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
            # Ray's Linux default; 0 would make `ray start --address` refuse to join a head.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            **token_env(files.token if spec.token else None)}


def ray_node_main(spec: RayNodeSpec) -> None:
    """One task of the Ray job: start this node's Ray under the lease; on node 0 also announce
    readiness. Returns when the node's Ray ends; raises (ending the whole job) when it failed."""
    import submitit  # noqa: PLC0415 - only the job's tasks read their Slurm environment

    env = submitit.JobEnvironment()
    nodes = list(env.hostnames)
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    index = nodes.index(node)
    ip, head_ip = socket.gethostbyname(node), socket.gethostbyname(nodes[0])
    temp_dir = f"/tmp/ray-{os.getuid()}-{env.job_id}-{index}"
    if len(temp_dir) > MAX_TEMP_DIR:
        raise ValueError(f"Ray temp dir {temp_dir} is too long for Ray's unix sockets")
    files = RayFiles.of(Path(spec.run_dir))
    command = watchdog_command(files.lease, spec.ray.lease_s, _ray_start(
        spec, index=index, node=node, ip=ip, temp_dir=temp_dir, head_ip=head_ip))
    print(f"ray node {index} on {node} ({ip}): {'head' if index == 0 else 'worker of ' + head_ip}", flush=True)
    started = time.time()
    wait_for_free_ports(pinned_ports(spec.ray, index), node=node, timeout_s=min(PORT_WAIT_S, spec.ray.readiness_timeout_s / 2))
    proc = subprocess.Popen(command, env=node_environment(spec))
    ready = files.ready(str(env.job_id))
    try:
        if index == 0:
            _announce_ready(spec, proc, job_id=str(env.job_id), nodes=nodes, ip=ip, node=node, started=started)
        status = proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    finally:
        ready.unlink(missing_ok=True)
    if status != 0:
        raise RuntimeError(f"Ray on {node} ended with status {status}")


def _preflight_probe() -> dict[str, str]:
    """Runs on every node: the project imports, and where this worker is."""
    import importlib  # noqa: PLC0415 - the probe runs in a Ray worker

    importlib.import_module("kimi_core.runtime.ray_slurm")
    return {"node": os.environ.get("SLURMD_NODENAME", socket.gethostname()), "job": os.environ.get("SLURM_JOB_ID", ""),
            "python": platform.python_version()}


def _announce_ready(spec: RayNodeSpec, proc: subprocess.Popen[bytes], *, job_id: str, nodes: list[str], ip: str,
                    node: str, started: float) -> None:
    """Wait until every node is in with its resources and imports the project; write the readiness file."""
    os.environ.update(node_environment(spec))  # before Ray is imported: it reads the auth settings once
    import ray  # noqa: PLC0415 - the head task is a driver for the readiness check only

    deadline = time.monotonic() + spec.ray.readiness_timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"Ray head on {node} exited with status {proc.returncode} before it was ready")
        try:
            ray.init(address=f"{ip}:{spec.ray.gcs_port}", logging_level=logging.ERROR, log_to_driver=False)
            break
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no Ray head answered on {ip}:{spec.ray.gcs_port}: {exc}") from exc
            time.sleep(1)
    try:
        missing = list(nodes)
        while True:
            alive = [n["Resources"] for n in ray.nodes() if n["Alive"]]  # type: ignore[no-untyped-call]
            seen = {key[len(NODE_RESOURCE_PREFIX):]: res for res in alive for key in res
                    if key.startswith(NODE_RESOURCE_PREFIX)}
            missing = [n for n in nodes if n not in seen or seen[n].get("GPU", 0) < spec.gpus_per_node
                       or seen[n].get("CPU", 0) < spec.cpus_per_node]
            if not missing:
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"Ray not ready: nodes not registered with {spec.cpus_per_node} CPUs and "
                                   f"{spec.gpus_per_node} GPUs each: {' '.join(missing)}")
            print(f"waiting for Ray nodes: {' '.join(missing)}", flush=True)
            time.sleep(1)
        probe = ray.remote(num_cpus=0)(_preflight_probe)
        refs = [probe.options(resources={NODE_RESOURCE_PREFIX + n: 0.001}).remote() for n in nodes]
        probes = ray.get(refs, timeout=max(1.0, deadline - time.monotonic()))
        totals = ray.cluster_resources()  # type: ignore[no-untyped-call]
    finally:
        ray.shutdown()
    record = {
        "job_id": job_id, "head_host": node, "head_ip": ip, "address": f"ray://{ip}:{spec.ray.client_port}",
        "gcs_address": f"{ip}:{spec.ray.gcs_port}", "nodes": nodes, "probes": probes,
        "resources": {"CPU": totals.get("CPU", 0), "GPU": totals.get("GPU", 0)},
        "ray_version": ray.__version__, "python_version": platform.python_version(),
        "ready_s": round(time.time() - started, 1),
    }
    write_text_atomic(RayFiles.of(Path(spec.run_dir)).ready(job_id), json.dumps(record, indent=2))
    print(f"ray cluster ready in {record['ready_s']} s: {record['address']}", flush=True)


# ---- the flow's side -------------------------------------------------------------------------
class JobQueue(Protocol):
    """Slurm's view of jobs (`slurm.ray_job.SlurmQueue`)."""

    def state(self, job_id: str) -> str: ...
    def reason(self, job_id: str) -> str: ...
    def in_queue(self, job_id: str) -> bool: ...
    def cancel(self, job_ids: Iterable[str]) -> None: ...


class RayJobSubmitter(Protocol):
    """Submits the run's Ray job (`slurm.ray_job.RaySlurmJobs`)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> str: ...
    def log_paths(self, job_id: str) -> list[Path]: ...


@dataclass(frozen=True)
class ReadyCluster:
    """A Ray job that announced readiness."""

    job_id: str
    address: str
    record: dict[str, Any]


def read_ready(files: RayFiles, job_id: str) -> dict[str, Any] | None:
    path = files.ready(job_id)
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record


def check_versions(record: dict[str, Any]) -> None:
    """A Ray or Python version mismatch between this process and the job is permanent (Ray Client refuses it)."""
    import ray  # noqa: PLC0415 - the flow process talks to the cluster

    here = {"ray": ray.__version__, "python": ".".join(platform.python_version().split(".")[:2])}
    there = {"ray": record.get("ray_version"), "python": ".".join(str(record.get("python_version")).split(".")[:2])}
    if here != there:
        raise PermanentFailure(f"the Ray job {record.get('job_id')} runs Ray {there['ray']} on Python "
                               f"{there['python']}, this process Ray {here['ray']} on Python {here['python']}: "
                               "use the same environment on the submit host and the nodes")


def log_tail(paths: Iterable[Path], lines: int = 20) -> str:
    chunks = []
    for path in paths:
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        chunks.append(f"--- {path}\n" + "\n".join(text))
    return "\n".join(chunks)


def wait_ready(files: RayFiles, job_id: str, *, queue: JobQueue, submitter: RayJobSubmitter, ray: RaySection,
               sleep: Callable[[float], None] = time.sleep) -> ReadyCluster:
    """Wait for Ray job `job_id`: PENDING without limit, RUNNING at most `ray.readiness_timeout_s`."""
    running_since: float | None = None
    reported = 0.0
    last_state = ""
    while True:
        state = queue.state(job_id)
        if state != last_state:
            console.print(f"Ray job {job_id}: {state.lower()}", markup=False)
            last_state = state
        if state == "RUNNING":
            running_since = running_since or time.monotonic()
            record = read_ready(files, job_id)
            if record is not None:
                return ReadyCluster(job_id=job_id, address=str(record["address"]), record=record)
            if time.monotonic() - running_since > ray.readiness_timeout_s:
                queue.cancel([job_id])
                raise SessionLost(f"Ray job {job_id} not ready within cluster.ray.readiness_timeout_s = "
                                  f"{ray.readiness_timeout_s} s; cancelled. Log tail:\n"
                                  f"{log_tail(submitter.log_paths(job_id))}")
        elif state in ("PENDING", "CONFIGURING", "UNKNOWN"):
            if state == "PENDING" and time.monotonic() - reported >= PENDING_REPORT_S:
                console.print(f"Ray job {job_id} pending (Slurm reason: {queue.reason(job_id) or 'none given'})", markup=False)
                reported = time.monotonic()
        else:
            raise SessionLost(f"Ray job {job_id} ended before it was ready: {state}. Log tail:\n"
                              f"{log_tail(submitter.log_paths(job_id))}")
        sleep(POLL_S)


def cancel_and_wait_gone(queue: JobQueue, job_ids: Iterable[str], *, timeout_s: float = LEAVE_QUEUE_S) -> None:
    """`scancel` the jobs and wait until none is in the queue (one writer per run directory)."""
    ids = [j for j in job_ids if queue.in_queue(j)]
    if not ids:
        return
    queue.cancel(ids)
    deadline = time.monotonic() + timeout_s
    while any(queue.in_queue(j) for j in ids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray job(s) {' '.join(ids)} still in the Slurm queue {timeout_s:.0f} s after scancel")
        time.sleep(1)


@dataclass(frozen=True)
class JobWatch:
    """Raises `SessionLost` once Ray job `job_id` is no longer RUNNING (checked between polls)."""

    queue: JobQueue
    job_id: str

    def __call__(self) -> None:
        state = self.queue.state(self.job_id)
        if state not in ("RUNNING", "UNKNOWN"):  # UNKNOWN: sacct lags a moment; the next look decides
            raise SessionLost(f"Ray job {self.job_id} ended: {state}")
