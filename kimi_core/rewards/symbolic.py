"""Time-bounded symbolic equivalence checks in a persistent worker process.

math-verify's own timeouts use `signal.alarm`, which only works in the main thread and cannot
interrupt a long C-level computation (e.g. the big-integer power behind `9^{9^{9^{9}}}`). So the
check runs in a child process; the parent waits at most the caller's budget and, on overrun,
kills the child and switches to a spare that was started in advance, so the next check does not
pay the ~0.5 s start-up (import of sympy and math-verify).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("_verify_worker.py")


class _Worker:
    """One child process and the bytes read from its stdout so far."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(WORKER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        self.buffer = bytearray()
        self.ready = False

    def read_line(self, deadline: float) -> str | None:
        """Next stdout line, or None if it did not come by `deadline` (or the child died)."""
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self.buffer.extend(chunk)
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


class SymbolicChecker:
    """`check(given, gold, timeout_s=...)` -> bool, never taking (much) longer than `timeout_s`.

    Thread-safe (checks are serialized). Start-up of a worker is not charged to a check's
    budget: it is bounded separately by `startup_timeout_s`.
    """

    def __init__(self, *, startup_timeout_s: float = 60.0) -> None:
        self.startup_timeout_s = startup_timeout_s
        self._lock = threading.Lock()
        self._active: _Worker | None = None
        self._spare: _Worker | None = None
        self.restarts = 0

    def start(self) -> None:
        """Launch the worker and its spare and wait until the worker is ready."""
        with self._lock:
            self._ready_worker()

    def check(self, given: str, gold: str, *, timeout_s: float) -> bool:
        """True iff math-verify finds `given` equivalent to `gold` within `timeout_s` seconds."""
        with self._lock:
            worker = self._ready_worker()
            if worker is None:
                return False
            deadline = time.monotonic() + timeout_s
            request = json.dumps([gold, given, timeout_s]) + "\n"
            try:
                os.write(worker.proc.stdin.fileno(), request.encode())  # type: ignore[union-attr]
            except OSError:
                self._replace_active()
                return False
            reply = worker.read_line(deadline)
            if reply is None:
                logger.warning("symbolic check exceeded %.2fs (or the worker died); restarting it", timeout_s)
                self._replace_active()
                return False
            return reply == "1"

    def _ready_worker(self) -> _Worker | None:
        if self._active is None:
            self._active = self._spare or _Worker()
            self._spare = None
        if self._spare is None:
            self._spare = _Worker()
        if not self._active.ready:
            line = self._active.read_line(time.monotonic() + self.startup_timeout_s)
            if line != "ready":
                logger.error("symbolic worker did not start within %.0fs", self.startup_timeout_s)
                self._active.kill()
                self._active = None
                return None
            self._active.ready = True
        return self._active

    def _replace_active(self) -> None:
        if self._active is not None:
            self._active.kill()
        self._active = None
        self.restarts += 1

    def close(self) -> None:
        """Stop both child processes."""
        with self._lock:
            for worker in (self._active, self._spare):
                if worker is not None:
                    worker.kill()
            self._active = self._spare = None


_default: SymbolicChecker | None = None
_default_lock = threading.Lock()


def default_checker() -> SymbolicChecker:
    """The process-wide checker, created on first use and stopped at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = SymbolicChecker()
            atexit.register(_default.close)
        return _default
