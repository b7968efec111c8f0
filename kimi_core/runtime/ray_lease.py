"""A lease watchdog: run a command, and end it with everything it started when the lease goes stale.

    python -m kimi_core.runtime.ray_lease --lease PATH --timeout S [--grace G] -- COMMAND...

The owner of a long-lived helper (the local Ray head; later, Ray on a Slurm allocation) touches
the lease file periodically (`ray_local.LeaseKeeper`). This watchdog runs COMMAND as its child and
polls the lease's mtime and the child; it ends everything when

- the lease's mtime has not changed for `--timeout` seconds (the owner is gone: SIGKILLed, its
  node lost — it could not stop the helper itself), or
- it receives SIGTERM, SIGINT or SIGHUP (an orderly stop: `ray_local.stop_local_ray_head`), or
- COMMAND exits by itself (what it left behind is cleaned up).

Ending means: SIGTERM the child, wait up to `--grace` seconds for the child and everything else
of ours to exit, then SIGKILL whatever is left. "Ours" is strictly this watchdog's process group
(it makes itself a session leader, so the group id is its pid and no outside process is in it)
plus its descendants (it is a child subreaper on Linux, so orphans of COMMAND are re-parented to
it rather than to init). Nothing is ever looked up or killed by name.

A missing lease file counts as an unchanged one. Staleness is measured on this process's own
monotonic clock from the last change it observed, so the owner's clock does not matter, and the
lease is given a full `--timeout` from the watchdog's start.

Import-light on purpose (stdlib and psutil only) so it starts in well under a second.
Exit status: COMMAND's when it exited by itself (128 + N for a signal N), `EXIT_LEASE_EXPIRED`
when the lease went stale, 128 + N when stopped by signal N.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

EXIT_LEASE_EXPIRED = 75
DEFAULT_GRACE_S = 10.0
POLL_S = 0.5
_PR_SET_CHILD_SUBREAPER = 36


def watchdog_command(
    lease_path: str | os.PathLike[str],
    timeout_s: float,
    command: Sequence[str],
    *,
    grace_s: float = DEFAULT_GRACE_S,
    python: str | None = None,
) -> list[str]:
    """The argv that runs `command` under this watchdog, guarded by the lease at `lease_path`.

    The module is run by its file path with `-P` (no script directory on sys.path), so the
    watchdog needs neither this package on sys.path nor its import: the copy that builds the
    command is the copy that runs.
    """
    if timeout_s <= 0 or grace_s < 0:
        raise ValueError(f"lease timeout {timeout_s} must be > 0 and grace {grace_s} >= 0")
    if not command:
        raise ValueError("no command to run under the lease watchdog")
    return [
        python or sys.executable,
        "-P",
        str(Path(__file__).resolve()),
        f"--lease={os.path.abspath(lease_path)}",
        f"--timeout={float(timeout_s)!r}",
        f"--grace={float(grace_s)!r}",
        "--",
        *command,
    ]


class LeaseWatch:
    """Tracks a lease file's mtime; `stale()` once it has not changed for `timeout_s` seconds."""

    def __init__(self, path: str | os.PathLike[str], timeout_s: float) -> None:
        self.path = os.fspath(path)
        self.timeout_s = timeout_s
        self._mtime_ns = self._read()
        self._changed_at = time.monotonic()

    def _read(self) -> int | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None

    def stale(self) -> bool:
        """Read the mtime now; True when it has been the same for at least `timeout_s`."""
        mtime_ns = self._read()
        now = time.monotonic()
        if mtime_ns != self._mtime_ns:
            self._mtime_ns, self._changed_at = mtime_ns, now
        return now - self._changed_at >= self.timeout_s


def _log(message: str) -> None:
    print(f"[ray_lease {os.getpid()}] {message}", file=sys.stderr, flush=True)


def _become_subreaper() -> None:
    """Best effort (Linux): orphans of our descendants are re-parented to us, not to init."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class _Reaper:
    """Collects exit statuses of all our children (the command and re-parented orphans)."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.child_code: int | None = None

    @property
    def child_pid(self) -> int | None:
        return None if self.child is None else self.child.pid

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.child is not None and pid == self.child.pid:
                self.child_code = _exit_code(status)
                self.child.returncode = self.child_code  # so Popen never waits on a reused pid


def _ours() -> list[psutil.Process]:
    """Live processes of ours other than this one: descendants and process-group members."""
    me = os.getpid()
    procs: dict[int, psutil.Process] = {}
    try:
        for child in psutil.Process(me).children(recursive=True):
            procs[child.pid] = child
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter():
        try:
            if proc.pid != me and os.getpgid(proc.pid) == me:
                procs.setdefault(proc.pid, proc)
        except (ProcessLookupError, PermissionError):
            continue
    alive = []
    for proc in procs.values():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


def _end_all(reaper: _Reaper, grace_s: float) -> None:
    """SIGTERM the command, wait up to `grace_s` for all of ours to exit, SIGKILL the rest."""
    if reaper.child_pid is not None and reaper.child_code is None:
        try:
            os.kill(reaper.child_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while True:
        reaper.reap()
        left = _ours()
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if left:
        _log(f"SIGKILL {len(left)} process(es) left after {grace_s:g} s: {[p.pid for p in left]}")
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        reaper.reap()
        if not _ours():
            break
        time.sleep(0.05)
    reaper.reap()


def run(
    lease_path: str | os.PathLike[str],
    timeout_s: float,
    command: Sequence[str],
    *,
    grace_s: float = DEFAULT_GRACE_S,
    poll_s: float = POLL_S,
) -> int:
    """Run `command` under the lease (see the module docstring); returns the exit status."""
    if os.getpgrp() != os.getpid():
        os.setsid()  # our own session and group: the group kill below can reach nobody else
    _become_subreaper()
    stop_signal: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_signal.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    watch = LeaseWatch(lease_path, timeout_s)
    reaper = _Reaper()
    if not stop_signal:
        try:
            reaper.child = subprocess.Popen(list(command))
        except OSError as exc:
            _log(f"cannot start {command[0]!r}: {exc}")
            return 127
    while True:
        reaper.reap()
        if stop_signal:
            _log(f"signal {signal.Signals(stop_signal[0]).name}: stopping")
            _end_all(reaper, grace_s)
            return 128 + stop_signal[0]
        if reaper.child_code is not None:
            _log(f"command exited with {reaper.child_code}; cleaning up")
            code = reaper.child_code
            _end_all(reaper, grace_s)
            return code
        if watch.stale():
            _log(f"lease {watch.path} unchanged for {timeout_s:g} s: its owner is gone; stopping")
            _end_all(reaper, grace_s)
            return EXIT_LEASE_EXPIRED
        time.sleep(poll_s)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: `--lease PATH --timeout S [--grace G] -- COMMAND...`."""
    parser = argparse.ArgumentParser(
        prog="python -m kimi_core.runtime.ray_lease", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--lease", required=True, help="lease file the owner touches")
    parser.add_argument("--timeout", type=float, required=True, help="seconds without a touch")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                        help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.timeout <= 0 or args.grace < 0:
        parser.error("need --timeout > 0, --grace >= 0 and a command after --")
    return run(args.lease, args.timeout, command, grace_s=args.grace)


if __name__ == "__main__":
    sys.exit(main())
