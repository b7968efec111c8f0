"""Failure classes (docs/design.md §4): transient failures are retried; permanent ones stop the run."""

from __future__ import annotations

import errno

# At import: importing submitit reconfigures logging, which must not happen while tasks log.
from submitit.core.utils import FailedJobError, UncompletedJobError

from kimi_core.engines.base import EngineBroken


class PermanentFailure(RuntimeError):
    """Retrying cannot fix this (bad input, a code error, the same failure at the same rollout twice)."""


class SessionLost(RuntimeError):
    """The engine session (its Ray actor or cluster) is gone: bring the cluster up again and resume.

    An engine that reports itself unusable (`kimi_core.engines.base.EngineBroken`) is a lost
    session too: `EngineSession` re-raises it as this class.
    """


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import ray.exceptions as rex  # noqa: PLC0415 - classifying needs no Ray in processes that have none loaded

        types += [rex.GetTimeoutError, rex.RaySystemError, rex.ObjectLostError, rex.NodeDiedError]
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    types.append(UncompletedJobError)
    return tuple(types)


#: Exception classes that, raised inside a stage job, are worth retrying (a job only reports its
#: error as traceback text, so the class is read from the trace's last line).
_TRANSIENT_IN_JOB = frozenset({
    "ConnectionError", "ConnectionResetError", "ConnectionRefusedError", "ConnectionAbortedError",
    "BrokenPipeError", "TimeoutError", "GetTimeoutError", "EndpointConnectionError", "ReadTimeoutError",
})


def job_error_line(trace: str) -> str | None:
    """The last `Name: message` line of a job's traceback text (submitit appends log paths after it)."""
    for line in reversed(trace.strip().splitlines()):
        head = line.split(":", 1)[0].strip()
        if head and " " not in head and head[0].isalpha() and (head.endswith(("Error", "Exception")) or "." in head):
            return line.strip()
    return None


def job_error_class(trace: str) -> str | None:
    """The exception class name of `job_error_line`."""
    line = job_error_line(trace)
    return None if line is None else line.split(":", 1)[0].strip().rsplit(".", 1)[-1]


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: lost connections, timeouts, preempted or lost jobs, I/O hiccups.

    A job whose own code raised (submitit's `FailedJobError`) is transient only when that error is:
    bad data or a code error in a stage fails the same way on every attempt.
    """
    if isinstance(exc, (PermanentFailure, SessionLost, EngineBroken)):
        return False
    if isinstance(exc, FailedJobError):
        return job_error_class(str(exc)) in _TRANSIENT_IN_JOB
    if isinstance(exc, OSError) and exc.errno in (errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ECONNRESET):
        return True
    return isinstance(exc, _transient_types())


class NotRunnableHere(PermanentFailure):
    """The recipe is valid, but this install cannot run it (no engine or executor for it): reported
    before any job is submitted."""
