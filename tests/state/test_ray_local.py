"""A real Ray head on loopback: tasks, a detached named actor across drivers, stop by pid; the
lease watchdog that ends a head whose owner is gone (also when the owner dies during start-up)."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from kimi_core.runtime.ray_lease import EXIT_LEASE_EXPIRED, watchdog_command
from kimi_core.runtime.ray_local import (
    LeaseKeeper,
    RayHead,
    can_bind,
    free_port,
    free_ports,
    is_alive,
    ray_env,
    remove_temp_dir,
    short_temp_dir,
    start_local_ray_head,
    stop_local_ray_head,
    worker_port_range,
)

NAMESPACE = "kimi-test"

_COUNTER = textwrap.dedent(
    """
    import sys, ray
    ray.init(address=sys.argv[1], namespace=sys.argv[2], logging_level="ERROR", log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self):
            self.value = 0
        def incr(self):
            self.value += 1
            return self.value
    """
)

_CREATE = _COUNTER + textwrap.dedent(
    """
    actor = Counter.options(name=sys.argv[3], lifetime="detached").remote()
    print("VALUE", ray.get(actor.incr.remote()))
    """
)

_REATTACH = _COUNTER + textwrap.dedent(
    """
    actor = ray.get_actor(sys.argv[3], namespace=sys.argv[2])
    print("VALUE", ray.get(actor.incr.remote()))
    if len(sys.argv) > 4 and sys.argv[4] == "kill":
        ray.kill(actor)
    """
)

_TASK = textwrap.dedent(
    """
    import sys, ray
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

    @ray.remote
    def square(x):
        return x * x

    @ray.remote
    def niceness():
        import os
        return os.getpriority(os.PRIO_PROCESS, 0)

    print("RESULT", sum(ray.get([square.remote(i) for i in range(5)])))
    print("CPUS", int(ray.cluster_resources()["CPU"]))
    print("NICE", ray.get(niceness.remote()))
    """
)


def _driver(script: str, *args: str) -> str:
    """Run a Ray driver in a fresh process (it disconnects when it exits); return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True, text=True, env=ray_env(), timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _listen_addresses(head: RayHead) -> set[str]:
    hosts = set()
    for pid in head.pids():
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        hosts.update(c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN)
    return hosts


def test_remote_task(ray_head: RayHead) -> None:
    assert is_alive(ray_head.address)
    out = _driver(_TASK, ray_head.address)
    assert "RESULT 30" in out  # 0 + 1 + 4 + 9 + 16
    assert "CPUS 2" in out
    # workers (the engine actor) run at our priority, not at Ray's default of nice + 15
    assert f"NICE {os.getpriority(os.PRIO_PROCESS, 0)}" in out


def test_listens_on_loopback_only(ray_head: RayHead) -> None:
    hosts = _listen_addresses(ray_head)
    assert hosts, "no listening sockets found for the head's processes"
    for host in hosts:
        address = ipaddress.ip_address(host)
        mapped = getattr(address, "ipv4_mapped", None)
        assert (mapped or address).is_loopback, f"Ray listens on {host}"


def test_detached_actor_survives_driver(ray_head: RayHead) -> None:
    assert "VALUE 1" in _driver(_CREATE, ray_head.address, NAMESPACE, "engine-session")
    # the creating driver has exited; a new driver re-attaches by name and sees the state
    assert "VALUE 2" in _driver(_REATTACH, ray_head.address, NAMESPACE, "engine-session")
    assert "VALUE 3" in _driver(_REATTACH, ray_head.address, NAMESPACE, "engine-session", "kill")


@contextlib.contextmanager
def _own_head() -> Iterator[RayHead]:
    """A head of the test's own (1 CPU, beside the session one), stopped and its temp dir removed after."""
    temp_dir = short_temp_dir()
    low, high = worker_port_range()
    head = start_local_ray_head(
        temp_dir=temp_dir, port=free_port(), num_cpus=1, object_store_memory=128 * 1024**2,
        min_worker_port=low, max_worker_port=high,
    )
    try:
        yield head
    finally:
        stop_local_ray_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_stop_by_pid_leaves_nothing() -> None:
    """A second head (beside the session one) with a live detached actor is stopped by pid."""
    with _own_head() as head:
        assert "VALUE 1" in _driver(_CREATE, head.address, NAMESPACE, "to-be-stopped")
        pids = head.pids()
        assert head.pid in pids and len(pids) >= 4  # root, gcs, raylet, actor worker, ...
        # only what a local run uses: no Ray Client server, log monitor or autoscaler monitor
        commands = [" ".join(psutil.Process(pid).cmdline()) for pid in pids if psutil.pid_exists(pid)]
        unused = [c for c in commands if any(name in c for name in (
            "ray.util.client.server", "log_monitor.py", "autoscaler/_private/monitor.py"))]
        assert unused == [] and any("gcs_server" in c for c in commands), commands
        # stop through a copy rebuilt from JSON, as another process would (from the manifest)
        rebuilt = RayHead(**json.loads(json.dumps(dataclasses.asdict(head))))
        stopped = stop_local_ray_head(rebuilt)
        assert set(pids) <= set(stopped)
        survivors = [pid for pid in pids if psutil.pid_exists(pid)
                     and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert survivors == []
        assert head.pids() == []
        assert not is_alive(head.address)
        assert stop_local_ray_head(head) == []  # idempotent


def test_head_stops_when_one_of_its_ray_processes_dies() -> None:
    """As `ray start --block`: a Ray process that dies (here the raylet, SIGKILLed) makes the head's
    process stop the others and exit 1, saying so in its log."""
    with _own_head() as head:
        pids = head.pids()
        raylet = [pid for pid in pids if psutil.Process(pid).name() == "raylet"]
        assert len(raylet) == 1, [psutil.Process(pid).name() for pid in pids]
        os.kill(raylet[0], signal.SIGKILL)
        assert psutil.Process(head.pid).wait(timeout=30) == 1
        assert _wait_for(lambda: head.pids() == [], 20, step_s=0.5), head.pids()
        log = Path(head.log_path).read_text(errors="replace")
        assert "Ray processes exited unexpectedly" in log and "raylet" in log, log[-3000:]
        assert not is_alive(head.address)


def test_start_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="too long"):
        start_local_ray_head(
            temp_dir="/tmp/" + "x" * 60, port=free_port(), num_cpus=1,
            object_store_memory=10**8, min_worker_port=21000, max_worker_port=21100,
        )
    with pytest.raises(ValueError, match="inside the worker port range"):
        start_local_ray_head(
            temp_dir="/tmp/kr-x", port=21050, num_cpus=1,
            object_store_memory=10**8, min_worker_port=21000, max_worker_port=21100,
        )


def test_start_rejects_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is already in use"):
            start_local_ray_head(
                temp_dir="/tmp/kr-x", port=port, num_cpus=1,
                object_store_memory=10**8, min_worker_port=21000, max_worker_port=21100,
            )


def test_free_ports_are_distinct_free_and_avoid_the_given_ones() -> None:
    """Separate free_port() calls can return one port twice (seen in CI: the dashboard and its agent
    got the same port and Ray refused); free_ports holds its sockets while picking."""
    given = free_port()
    for _ in range(50):
        ports = free_ports(3, besides=[given])
        assert len(set(ports)) == 3 and given not in ports
        assert all(can_bind(p) for p in ports)


def test_is_alive_on_closed_port() -> None:
    assert not is_alive(f"127.0.0.1:{free_port()}")
    assert not is_alive("not-an-address")


# --- the lease watchdog on its own (no Ray: fast) ---------------------------------------------

_STUBBORN = 'trap "" TERM; sleep 600 & sleep 600 & wait'  # ignores SIGTERM, has two children


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tree(pid: int) -> list[int]:
    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _wait_for(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


def _watchdog(lease: Path, timeout_s: float, command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        watchdog_command(lease, timeout_s, command, grace_s=1.0), start_new_session=True,
        stderr=subprocess.DEVNULL,
    )


def test_watchdog_ends_command_when_lease_goes_stale(tmp_path: Path) -> None:
    lease = tmp_path / "lease"
    lease.touch()
    spawned = time.monotonic()
    proc = _watchdog(lease, 1.5, ["sh", "-c", _STUBBORN])
    try:
        assert _wait_for(lambda: len(_tree(proc.pid)) >= 4, 10)  # watchdog, sh, 2 x sleep
        pids = _tree(proc.pid)
        # SIGTERM is ignored by the command: the watchdog must escalate to SIGKILL after grace
        assert proc.wait(timeout=15) == EXIT_LEASE_EXPIRED
        assert time.monotonic() - spawned >= 1.5  # not before the lease expired
        assert [pid for pid in pids if _alive(pid)] == []
    finally:
        for pid in _tree(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_watchdog_keeps_command_while_lease_is_fresh_and_stops_on_sigterm(tmp_path: Path) -> None:
    lease = tmp_path / "sub" / "lease"
    with LeaseKeeper(lease, lease_timeout_s=1.0) as keeper:
        assert keeper.start() is keeper and keeper.running  # idempotent
        proc = _watchdog(lease, 1.0, ["sh", "-c", _STUBBORN])
        try:
            time.sleep(3.0)  # three lease timeouts
            assert proc.poll() is None
            pids = _tree(proc.pid)
            assert len(pids) >= 4
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 128 + signal.SIGTERM
            assert [pid for pid in pids if _alive(pid)] == []
        finally:
            for pid in _tree(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert not keeper.running
    keeper.stop()  # idempotent


def test_watchdog_passes_on_the_command_exit_status(tmp_path: Path) -> None:
    proc = _watchdog(tmp_path / "lease", 30.0, ["sh", "-c", "exit 7"])
    assert proc.wait(timeout=15) == 7


# --- leased Ray heads ----------------------------------------------------------------------------

LEASE_TIMEOUT_S = 5.0
REPO_ROOT = Path(__file__).resolve().parents[2]

_OWNER = textwrap.dedent(
    """
    import dataclasses, json, sys, time
    from kimi_core.runtime.ray_local import (
        LeaseKeeper, free_port, short_temp_dir, start_local_ray_head, worker_port_range)

    lease, timeout, moment = sys.argv[1], float(sys.argv[2]), sys.argv[3]

    def spawned(head):
        print("SPAWNED", json.dumps(dataclasses.asdict(head)), flush=True)
        if moment == "starting":
            time.sleep(3600)  # killed in here, while the head starts up

    keeper = LeaseKeeper(lease, lease_timeout_s=timeout).start()
    low, high = worker_port_range()
    head = start_local_ray_head(
        temp_dir=short_temp_dir(), port=free_port(), num_cpus=1,
        object_store_memory=128 * 1024**2, min_worker_port=low, max_worker_port=high,
        lease_path=lease, lease_timeout_s=timeout, on_spawn=spawned)
    print("READY", flush=True)
    time.sleep(3600)
    """
)


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line mentions `text` (read only: used to check, never to kill)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and any(text in arg for arg in proc.info["cmdline"] or ()) \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def _read_line(proc: subprocess.Popen[str], prefix: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line[len(prefix):].strip()
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"owner printed no {prefix!r} line (exit {proc.poll()})")


@pytest.mark.parametrize("moment", ["starting", "ready"])
def test_head_ends_itself_when_its_owner_is_killed(tmp_path: Path, moment: str) -> None:
    """SIGKILL the owner's whole process group — during start-up, or with the head ready — and
    every process of the head is gone within the lease timeout plus a bounded stop."""
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(tmp_path / "lease"), str(LEASE_TIMEOUT_S), moment],
        stdout=subprocess.PIPE, text=True, env={**ray_env(), "PYTHONPATH": str(REPO_ROOT)},
        start_new_session=True,
    )
    head: RayHead | None = None
    try:
        head = RayHead(**json.loads(_read_line(owner, "SPAWNED ", 60)))
        assert head.lease_path == str(tmp_path / "lease")
        assert head.lease_timeout_s == LEASE_TIMEOUT_S
        if moment == "starting":
            time.sleep(2.0)  # Ray is part way through starting its processes
        else:
            _read_line(owner, "READY", 120)
            assert is_alive(head.address)
        pids = head.pids()
        assert head.pid in pids
        if moment == "ready":
            assert len(pids) >= 4  # watchdog, the head's process, gcs_server, raylet, ...
        os.killpg(owner.pid, signal.SIGKILL)  # the owner as the user killed it: the whole group
        owner.wait(timeout=10)
        killed = time.monotonic()
        gone = _wait_for(
            lambda: not any(_alive(pid) for pid in pids) and head.pids() == []
            and not _processes_mentioning(head.temp_dir),
            LEASE_TIMEOUT_S + 20, step_s=0.5,
        )
        elapsed = time.monotonic() - killed
        assert gone, (f"left after {elapsed:.0f} s: {[p for p in pids if _alive(p)]} "
                      f"{head.pids()} {_processes_mentioning(head.temp_dir)}")
        assert elapsed >= LEASE_TIMEOUT_S - 1.5  # the lease, not something else, ended it
        log = Path(head.log_path).read_text(errors="replace")
        assert "its owner is gone; stopping" in log, log[-3000:]
        assert not is_alive(head.address)
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)
            owner.wait(timeout=10)
        if head is not None:
            stop_local_ray_head(head)
            shutil.rmtree(head.temp_dir, ignore_errors=True)


def test_leased_head_is_described_before_ready_and_stops_cleanly(tmp_path: Path) -> None:
    """`on_spawn` gets the head while it is still starting; stopping it by pid (as another
    process would, from the manifest) leaves none of its processes."""
    temp_dir = short_temp_dir()
    lease = tmp_path / "lease"
    low, high = worker_port_range()
    seen: list[dict[str, object]] = []

    def on_spawn(spawned: RayHead) -> None:
        seen.append({
            "head": spawned,
            "root_alive": _alive(spawned.pid),
            "gcs_up": is_alive(spawned.address, timeout_s=0.5),
            "ready_logged": "will now block forever" in Path(spawned.log_path).read_text(),
        })

    keeper = LeaseKeeper(lease, lease_timeout_s=LEASE_TIMEOUT_S).start()
    head = start_local_ray_head(
        temp_dir=temp_dir, port=free_port(), num_cpus=1, object_store_memory=128 * 1024**2,
        min_worker_port=low, max_worker_port=high, lease_path=lease,
        lease_timeout_s=LEASE_TIMEOUT_S, on_spawn=on_spawn,
    )
    try:
        assert len(seen) == 1
        assert seen[0] == {"head": head, "root_alive": True, "gcs_up": False, "ready_logged": False}
        time.sleep(LEASE_TIMEOUT_S + 1)  # the keeper holds the lease: the head stays
        assert is_alive(head.address)
        pids = head.pids()
        assert head.pid in pids and len(pids) >= 4
        root = psutil.Process(head.pid)
        assert "ray_lease" in " ".join(root.cmdline())
        head_process = root.children()
        assert len(head_process) == 1  # the head's process, in the watchdog's process group
        assert os.getpgid(head_process[0].pid) == os.getpgid(head.pid) == head.pid
        rebuilt = RayHead(**json.loads(json.dumps(dataclasses.asdict(head))))
        assert rebuilt == head
        assert not remove_temp_dir(rebuilt) and Path(head.log_path).is_file()  # not while it runs
        stopped = stop_local_ray_head(rebuilt)
        assert set(pids) <= set(stopped)
        assert [pid for pid in pids if _alive(pid)] == []
        assert head.pids() == [] and _processes_mentioning(temp_dir) == []
        assert not is_alive(head.address)
        assert stop_local_ray_head(head) == []
        assert remove_temp_dir(rebuilt) and not Path(temp_dir).exists()  # stopped: its logs can go
    finally:
        keeper.stop()
        stop_local_ray_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_old_records_without_lease_fields_still_load() -> None:
    record = '{"address": "127.0.0.1:1", "pid": 1, "temp_dir": "/tmp/kr-x", "log_path": "/tmp/x"}'
    head = RayHead(**json.loads(record))  # as written to run manifests before leases existed
    assert head.lease_path is None and head.lease_timeout_s is None


def test_remove_temp_dir_leaves_a_dir_that_holds_no_head_log(tmp_path: Path) -> None:
    """Only a head's own temp dir (its log inside) is removed: a record pointing elsewhere removes nothing."""
    other = tmp_path / "kr-other"
    other.mkdir()
    (other / "data.txt").write_text("keep")
    ended = subprocess.Popen(["true"])  # a pid no process has any more
    ended.wait()
    record = RayHead(address="127.0.0.1:1", pid=ended.pid, temp_dir=str(other),
                     log_path=str(other / "ray-head.log"))
    assert not remove_temp_dir(record) and (other / "data.txt").read_text() == "keep"
    elsewhere = RayHead(address="127.0.0.1:1", pid=ended.pid, temp_dir=str(other),
                        log_path=str(tmp_path / "ray-head.log"))
    (tmp_path / "ray-head.log").write_text("a log outside the dir")
    assert not remove_temp_dir(elsewhere) and (other / "data.txt").read_text() == "keep"
