"""A real Ray head on loopback: tasks, a detached named actor across drivers, stop by pid."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import psutil
import pytest

from kimi_core.runtime.ray_local import (
    RayHead,
    free_port,
    is_alive,
    ray_env,
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


def test_stop_by_pid_leaves_nothing() -> None:
    """A second head (beside the session one) with a live detached actor is stopped by pid."""
    temp_dir = short_temp_dir()
    low, high = worker_port_range()
    head = start_local_ray_head(
        temp_dir=temp_dir, port=free_port(), num_cpus=1, object_store_memory=128 * 1024**2,
        min_worker_port=low, max_worker_port=high,
    )
    try:
        assert "VALUE 1" in _driver(_CREATE, head.address, NAMESPACE, "to-be-stopped")
        pids = head.pids()
        assert head.pid in pids and len(pids) >= 4  # root, gcs, raylet, actor worker, ...
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
    finally:
        stop_local_ray_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


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


def test_is_alive_on_closed_port() -> None:
    assert not is_alive(f"127.0.0.1:{free_port()}")
    assert not is_alive("not-an-address")
