"""Time-bounded sympy equivalence checks in a persistent worker process, failing loudly.

sympy cannot be interrupted inside a long C-level computation (e.g. a huge factorial), and
`signal.alarm` only works in the main thread, so the check runs in a child process
(`_verify_worker.py`); the parent waits at most the caller's budget.

Outcomes of one `check`:
- answer: the worker's verdict;
- timeout: the answer is pathological: it scores False, the worker is killed and the spare
  (started in advance, so the next check does not pay the ~0.5 s start-up) takes over; counted in
  `timeouts` (expected, not a fault);
- crash: the worker died by itself (killed from outside, out of memory...): counted in `restarts`,
  and the same check is retried once on a fresh worker within what is left of the budget;
- a worker that cannot start at all (bad command, import error, no `ready` within
  `startup_timeout_s`) raises `GraderStartError` naming the command, its exit code and the end of
  its stderr, instead of every hard answer silently scoring 0.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

logger = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("_verify_worker.py")
DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-u", str(WORKER_SCRIPT))


class GraderStartError(RuntimeError):
    """The symbolic grader's worker process could not be started."""


class _Read(Enum):
    TIMEOUT = "timeout"
    DIED = "died"


class _Worker:
    """One child process, the bytes read from its stdout so far, and its stderr in a temp file."""

    def __init__(self, command: Sequence[str]) -> None:
        self.command = list(command)
        self.stderr = tempfile.TemporaryFile()
        self.buffer = bytearray()
        self.ready = False
        try:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, bufsize=0
            )
            self.spawn_error: str | None = None
        except OSError as exc:
            self.proc, self.spawn_error = None, f"{type(exc).__name__}: {exc}"

    def read_line(self, deadline: float) -> str | _Read:
        """Next stdout line, or why none came by `deadline`."""
        if self.proc is None:
            return _Read.DIED
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _Read.TIMEOUT
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return _Read.TIMEOUT
            chunk = os.read(fd, 4096)
            if not chunk:
                return _Read.DIED
            self.buffer.extend(chunk)
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line.decode(errors="replace")

    def send(self, request: str) -> bool:
        """Write one request line; False if the worker is gone."""
        if self.proc is None:
            return False
        try:
            os.write(self.proc.stdin.fileno(), request.encode())  # type: ignore[union-attr]
            return True
        except OSError:
            return False

    def failure(self) -> str:
        """Why this worker is not usable: spawn error or exit code, plus the end of its stderr."""
        if self.spawn_error is not None:
            return self.spawn_error
        assert self.proc is not None
        code = self.proc.poll()
        self.stderr.seek(0)
        tail = self.stderr.read()[-2000:].decode(errors="replace").strip()
        state = "still running" if code is None else f"exit code {code}"
        return f"{state}; stderr: {tail or '(empty)'}"

    def kill(self) -> None:
        """Kill and reap the process; its stderr stays readable until `close`."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None and not stream.closed:
                    stream.close()

    def close(self) -> None:
        self.kill()
        self.stderr.close()


class SymbolicChecker:
    """`check(given, gold, timeout_s=...)` -> bool, never taking (much) longer than `timeout_s`.

    `command` is the worker's argv (default: this Python running `_verify_worker.py`). Thread-safe
    (checks are serialized). Start-up of a worker is not charged to a check's budget: it is bounded
    separately by `startup_timeout_s`. Counters: `restarts` (worker crashes), `timeouts` (checks
    over budget).
    """

    def __init__(self, *, command: Sequence[str] | None = None, startup_timeout_s: float = 60.0) -> None:
        self.command: tuple[str, ...] = tuple(command) if command is not None else DEFAULT_COMMAND
        self.startup_timeout_s = startup_timeout_s
        self._lock = threading.Lock()
        self._active: _Worker | None = None
        self._spare: _Worker | None = None
        self.restarts = 0
        self.timeouts = 0
        self._ever_ready = False  # a worker that dies before `ready` is retried only after a success

    def start(self) -> None:
        """Launch the worker and its spare and wait until the worker is ready; raise if it cannot start."""
        with self._lock:
            self._ready_worker()

    def worker_pid(self) -> int | None:
        """Process id of the worker that takes the next check (None before start)."""
        with self._lock:
            active = self._active
            return None if active is None or active.proc is None else active.proc.pid

    def check(self, given: str, gold: str, *, timeout_s: float) -> bool:
        """True iff sympy finds `(gold)-(given)` to be 0 within `timeout_s` seconds."""
        with self._lock:
            deadline = time.monotonic() + timeout_s
            request = json.dumps([gold, given]) + "\n"
            for _attempt in range(2):
                worker = self._ready_worker()
                reply = worker.read_line(deadline) if worker.send(request) else _Read.DIED
                if isinstance(reply, str):
                    return reply == "1"
                if reply is _Read.TIMEOUT:
                    self._discard_active()
                    self.timeouts += 1
                    logger.info("symbolic check exceeded %.2fs; worker replaced", timeout_s)
                    return False
                worker.kill()  # reaped first, so failure() reports its exit code
                logger.warning("symbolic grader worker died during a check (%s); restarted", worker.failure())
                self._discard_active()
                self.restarts += 1
                if deadline - time.monotonic() <= 0:
                    return False
            return False

    def _ready_worker(self) -> _Worker:
        """The active worker, ready; a spare that died while idle is replaced (counted as a restart)."""
        failure = ""
        for _ in range(3):
            if self._active is None:
                self._active = self._spare or _Worker(self.command)
                self._spare = None
            if self._spare is None:
                self._spare = _Worker(self.command)
            if self._active.ready:
                return self._active
            line = self._active.read_line(time.monotonic() + self.startup_timeout_s)
            if line == "ready":
                self._active.ready = self._ever_ready = True
                return self._active
            self._active.kill()
            failure = self._active.failure()
            if line is _Read.TIMEOUT:
                failure = f"no 'ready' within {self.startup_timeout_s:g}s, so killed; {failure}"
            self._discard_active()
            self._discard_spare()
            if line is _Read.DIED and self._ever_ready:
                self.restarts += 1
                logger.warning("symbolic grader worker died before it was ready (%s); retrying", failure)
                continue
            break
        raise GraderStartError(f"symbolic grader worker {list(self.command)} failed to start: {failure}")

    def _discard_active(self) -> None:
        if self._active is not None:
            self._active.close()
        self._active = None

    def _discard_spare(self) -> None:
        if self._spare is not None:
            self._spare.close()
        self._spare = None

    def close(self) -> None:
        """Stop both child processes."""
        with self._lock:
            self._discard_active()
            self._discard_spare()


_default: SymbolicChecker | None = None
_default_lock = threading.Lock()


def default_checker() -> SymbolicChecker:
    """The process-wide checker, created on first use and stopped at exit."""
    global _default  # noqa: PLW0603 - the process-wide checker, created once
    with _default_lock:
        if _default is None:
            _default = SymbolicChecker()
            atexit.register(_default.close)
        return _default


def grader_restarts() -> int:
    """Crashes of the process-wide checker's worker so far (0 before first use)."""
    return 0 if _default is None else _default.restarts


def grader_timeouts() -> int:
    """Checks of the process-wide checker that ran over their budget so far (0 before first use)."""
    return 0 if _default is None else _default.timeouts
