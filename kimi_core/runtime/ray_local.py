"""A Ray head on loopback for the local recipe and tests, started and stopped by pid.

The head's process (`ray_head_process`: Ray's node with only what a local run uses, in the manner
of `ray start --head --block`) runs as our child in its own session (process group); every Ray
process of this head (GCS, raylet, workers, agents) descends from it. Stopping sends SIGTERM to
that root (Ray drains and stops its children), then SIGKILLs whatever of the recorded tree or
process group is left. Never `ray stop` or a kill by name: other Ray clusters may share the host.

Because the head has its own session, a kill of the owner's process group does not reach it. With
a lease (`lease_path=`), the root is instead the lease watchdog (`kimi_core.runtime.ray_lease`),
which runs the head's process as its child and ends the whole head once the owner stops touching the
lease file (`LeaseKeeper`) for `lease_timeout_s` — so a head outlives a SIGKILLed owner by a
bounded time, also when the kill lands during start-up. `on_spawn` hands the head to the caller
right after spawning, before the (seconds long) wait for readiness, so it can be recorded first.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import psutil

from kimi_core.recipe.sections import LOCAL_HEAD_WORKER_PORTS
from kimi_core.runtime import ray_head_process
from kimi_core.runtime.ray_head_process import READY_LINE
from kimi_core.runtime.ray_lease import watchdog_command


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host` (the OS picks it; racy by nature)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1", *, besides: Iterable[int] = ()) -> list[int]:
    """`count` distinct TCP ports free right now on `host`, none of them in `besides`: the sockets are
    held open together while the OS picks them (separate `free_port()` calls may return the same
    port twice)."""
    taken, held, ports = set(besides), list[socket.socket](), list[int]()
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
            if port not in taken:
                taken.add(port)
                ports.append(port)
        return ports
    finally:
        for sock in held:
            sock.close()


def worker_port_range(size: int = 200) -> tuple[int, int]:
    """A random block of `size` worker ports in `LOCAL_HEAD_WORKER_PORTS` — below Linux's ephemeral
    range, so it cannot contain a `free_port()` result; random so two heads on a host rarely overlap;
    never a port a Ray-on-Slurm layout pins (the recipe rules keep those out of it)."""
    low, high = LOCAL_HEAD_WORKER_PORTS
    start = low + secrets.randbelow((high - low) // size) * size
    return start, start + size - 1


def can_bind(port: int, host: str = "127.0.0.1", *, reuse_address: bool = False) -> bool:
    """Whether a TCP socket can bind `host:port` right now; with `reuse_address` (SO_REUSEADDR, as
    gRPC sets it) a port whose only sockets are in TIME_WAIT counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def short_temp_dir(prefix: str = "kr-") -> str:
    """A new, short Ray temp dir such as `/tmp/kr-1a2b3c4d` (Unix socket paths max ~107 bytes)."""
    root = "/tmp" if os.path.isdir("/tmp") else os.path.realpath(os.environ.get("TMPDIR", "."))
    path = os.path.join(root, f"{prefix}{secrets.token_hex(4)}")
    os.makedirs(path, mode=0o700)
    return path


def ray_env() -> dict[str, str]:
    """Environment for Ray processes and drivers: loopback only, no usage stats, no token auth.

    Token auth is off explicitly: Ray (2.5x+) turns it on for a new head whenever a token file
    exists (a plain `ray.init()` anywhere on the machine writes `~/.ray/auth_token`), and then
    drivers started without the token cannot connect. These heads listen on 127.0.0.1 only.
    """
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled"}


@dataclass(frozen=True)
class RayHead:
    """A running head: `address` is `127.0.0.1:PORT` (GCS); `pid` is the root of its processes.

    The root is the head's process (`ray_head_process`), or, for a leased head (`lease_path` set),
    the lease watchdog that runs it as its child. Serialised with `dataclasses.asdict` and rebuilt
    with `RayHead(**d)`; fields added later have defaults so older records still load.
    """

    address: str
    pid: int
    temp_dir: str
    log_path: str
    ports: dict[str, int] = field(default_factory=dict)
    lease_path: str | None = None
    lease_timeout_s: float | None = None

    def pids(self) -> list[int]:
        """Live pids of this head: the root, its descendants and its process group."""
        return sorted(_head_processes(self))


def _head_processes(head: RayHead) -> set[int]:
    """Live pids of `head`: the root (the head's process or the lease watchdog; checked by its command
    line, so a reused pid is never touched), its descendants, and members of its process group
    (orphans keep the group; Linux does not reuse a pid while a group of that id exists)."""
    pids: set[int] = set()
    try:
        root = psutil.Process(head.pid)
        if f"--temp-dir={head.temp_dir}" not in root.cmdline():
            return set()  # the root is gone and its pid now belongs to someone else
        pids.add(head.pid)
        pids.update(child.pid for child in root.children(recursive=True))
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        pass
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == head.pid:
                pids.add(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return {pid for pid in pids if _is_running(pid)}


def _is_running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def head_command(
    *, temp_dir: str, ports: dict[str, int], num_cpus: int, object_store_memory: int
) -> list[str]:
    """The argv of the head's process (`ray_head_process`, run by its file path: see its docstring)."""
    return [
        sys.executable,
        "-P",
        str(Path(ray_head_process.__file__).resolve()),
        f"--temp-dir={temp_dir}",
        f"--port={ports['gcs']}",
        f"--num-cpus={num_cpus}",
        f"--object-store-memory={object_store_memory}",
        f"--min-worker-port={ports['min_worker']}",
        f"--max-worker-port={ports['max_worker']}",
        f"--dashboard-port={ports['dashboard']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent']}",
    ]


def touch_lease(path: str | os.PathLike[str]) -> None:
    """Create the lease file (and its directory) or set its mtime to now."""
    lease = Path(path)
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.touch()


class LeaseKeeper:
    """Keeps a lease fresh from the owner's process: a daemon thread touches it every `interval_s`.

    `interval_s` defaults to `lease_timeout_s / 6`, so a few missed touches (a busy disk, a
    stalled interpreter) do not expire the lease. The thread dies with the process, which is the
    point: a SIGKILLed owner stops touching and the head ends itself. `start()` and `stop()` are
    idempotent; `start()` touches once before it returns. Usable as a context manager.
    """

    def __init__(
        self,
        lease_path: str | os.PathLike[str],
        *,
        lease_timeout_s: float = 30.0,
        interval_s: float | None = None,
    ) -> None:
        if lease_timeout_s <= 0:
            raise ValueError(f"lease_timeout_s must be > 0, not {lease_timeout_s}")
        self.lease_path = os.path.abspath(lease_path)
        self.interval_s = lease_timeout_s / 6 if interval_s is None else interval_s
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, not {self.interval_s}")
        self.last_error: OSError | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """True while the touching thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Self:
        """Touch the lease now and keep touching it in the background (no-op when running)."""
        with self._lock:
            if self.running:
                return self
            touch_lease(self.lease_path)
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(self._stop,), name=f"lease-keeper {self.lease_path}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop touching (no-op when not running); the lease then expires after its timeout."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is not None:
            thread.join()

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            try:
                touch_lease(self.lease_path)
                self.last_error = None
            except OSError as exc:  # keep trying: a transient error must not end the head
                self.last_error = exc

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


_LEASES: dict[Path, LeaseKeeper] = {}
_LEASES_LOCK = threading.Lock()


def keep_lease(path: Path, *, lease_timeout_s: float) -> Path:
    """Start touching the lease at `path` from this process for as long as it lives (once per path
    per process: one `LeaseKeeper` each, shared by every head this process brings up); return it."""
    with _LEASES_LOCK:
        if path not in _LEASES:
            path.parent.mkdir(parents=True, exist_ok=True)
            _LEASES[path] = LeaseKeeper(path, lease_timeout_s=lease_timeout_s).start()
    return path


def start_local_ray_head(
    *,
    temp_dir: str,
    port: int,
    num_cpus: int,
    object_store_memory: int,
    min_worker_port: int,
    max_worker_port: int,
    dashboard_port: int | None = None,
    timeout_s: float = 90.0,
    lease_path: str | os.PathLike[str] | None = None,
    lease_timeout_s: float = 30.0,
    on_spawn: Callable[[RayHead], None] | None = None,
    preload_modules: Sequence[str] = (),
) -> RayHead:
    """Start a head on 127.0.0.1 and wait (bounded) until a driver can `ray.init` to it.

    `temp_dir` must be short (see `short_temp_dir`); worker ports `[min, max]` must not contain
    the other ports. Raises RuntimeError with the log tail when Ray exits or is not ready in time
    (the head is stopped first).

    With `lease_path`, the lease file is created/touched before spawning and the head runs under
    the lease watchdog: it ends itself (SIGTERM, then SIGKILL, of all its processes) once the
    lease's mtime has not changed for `lease_timeout_s`. This function keeps the lease fresh
    while it waits; from its return on, the caller must (a `LeaseKeeper` on the same path,
    started before or right after this call).

    `on_spawn(head)` is called right after the head's processes are spawned and before waiting
    for readiness, so the caller can record the head (e.g. in the run manifest) before anything
    slow happens. If it raises, the head is stopped and the error propagates.

    `preload_modules`: what every worker of the head imports before it takes work (Ray's
    `preload_python_modules` setting); the raylet starts one idle worker per CPU ahead of time.
    """
    if len(temp_dir) > 40:
        raise ValueError(f"temp_dir {temp_dir!r} is too long for Ray's Unix sockets (keep <= 40)")
    if not 1024 < min_worker_port < max_worker_port < 65536:
        raise ValueError(f"worker ports [{min_worker_port}, {max_worker_port}] are not a range")
    given = [port] if dashboard_port is None else [port, dashboard_port]
    picked = iter(free_ports(3 - len(given), besides=given))
    ports = {
        "gcs": port,
        "dashboard": dashboard_port or next(picked),
        "dashboard_agent": next(picked),
        "min_worker": min_worker_port,
        "max_worker": max_worker_port,
    }
    clashes = [k for k, v in ports.items() if "worker" not in k and min_worker_port <= v <= max_worker_port]
    if clashes:
        raise ValueError(f"ports {clashes} fall inside the worker port range; move the range")
    if is_alive(f"127.0.0.1:{port}", timeout_s=1.0) or not can_bind(port):
        raise ValueError(f"port {port} on 127.0.0.1 is already in use; pick another (free_port())")
    os.makedirs(temp_dir, exist_ok=True)
    log_path = os.path.join(temp_dir, "ray-head.log")
    command = head_command(
        temp_dir=temp_dir, ports=ports, num_cpus=num_cpus, object_store_memory=object_store_memory
    )
    # No drain on SIGTERM: a local head has no Serve replicas to migrate; stop promptly. Workers at
    # normal priority (Ray's default is nice 15): on a shared machine the engine actor is the work.
    env = {**ray_env(), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_worker_niceness": "0"}
    if preload_modules:
        env["RAY_preload_python_modules"] = ",".join(preload_modules)
    lease: str | None = None
    keeper: LeaseKeeper | None = None
    if lease_path is not None:
        if lease_timeout_s <= 0:
            raise ValueError(f"lease_timeout_s must be > 0, not {lease_timeout_s}")
        lease = os.path.abspath(lease_path)
        touch_lease(lease)
        # the watchdog is the session leader; the head's process runs as its child in the same group
        # and writes to the same log (the watchdog's own lines are prefixed `[ray_lease PID]`)
        command = watchdog_command(lease, lease_timeout_s, command)
        keeper = LeaseKeeper(lease, lease_timeout_s=lease_timeout_s)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    head = RayHead(
        address=f"127.0.0.1:{port}", pid=proc.pid, temp_dir=temp_dir, log_path=log_path,
        ports=ports, lease_path=lease,
        lease_timeout_s=lease_timeout_s if lease is not None else None,
    )
    try:
        if keeper is not None:
            keeper.start()
        if on_spawn is not None:
            on_spawn(head)
        _wait_ready(head, proc, deadline=time.monotonic() + timeout_s)
    except BaseException:
        stop_local_ray_head(head)
        raise
    finally:
        if keeper is not None:
            keeper.stop()
    return head


def _log_tail(path: str, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(head: RayHead, proc: subprocess.Popen[bytes], *, deadline: float) -> None:
    """Until the head's process says it is ready: its node is up and a driver connected to it."""
    while READY_LINE not in Path(head.log_path).read_text(errors="replace"):
        if proc.poll() is not None:
            raise RuntimeError(
                f"the Ray head exited with code {proc.returncode}; log {head.log_path}:\n"
                + _log_tail(head.log_path)
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"Ray head at {head.address} not started in time; log tail:\n"
                + _log_tail(head.log_path)
            )
        time.sleep(0.1)


def stop_local_ray_head(head: RayHead, *, grace_s: float = 20.0) -> list[int]:
    """Stop `head` by pid: SIGTERM the root, wait up to `grace_s`, SIGKILL the rest.

    For a leased head the root is the watchdog: it forwards the SIGTERM to the head's process and
    SIGKILLs what is left of its group after its own, shorter grace. The lease file is left as
    is (the caller owns it; stop its `LeaseKeeper`).

    Returns the pids that were signalled. Only processes of this head are touched.
    """
    targets = _head_processes(head)
    if not targets:
        return []
    try:
        os.kill(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_is_running(pid) for pid in targets):
        _reap(head.pid)
        time.sleep(0.2)
    targets |= _head_processes(head)
    for pid in sorted(targets):
        if _is_running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    psutil.wait_procs([p for p in map(_process_or_none, targets) if p is not None], timeout=10)
    _reap(head.pid)
    return sorted(targets)


def remove_temp_dir(head: RayHead) -> bool:
    """Delete a stopped head's temp dir (Ray's session files and logs, the workers' output among
    them); returns whether it did. Nothing is removed while a process of the head runs, nor a dir
    without the head's own log in it (not a temp dir this module started a head in)."""
    if _head_processes(head) or not os.path.isfile(head.log_path):
        return False
    if os.path.dirname(os.path.abspath(head.log_path)) != os.path.abspath(head.temp_dir):
        return False
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    return not os.path.exists(head.temp_dir)


def _process_or_none(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _reap(pid: int) -> None:
    """Collect the exit status of our own child so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def is_alive(address: str, *, timeout_s: float = 2.0) -> bool:
    """True when the GCS at `host:port` accepts TCP connections."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False
