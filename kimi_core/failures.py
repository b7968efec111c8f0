"""Failure classes (DESIGN §4): transient failures are retried; permanent ones stop the run."""

from __future__ import annotations

import errno


class PermanentFailure(RuntimeError):
    """Retrying cannot fix this (bad input, a code error, the same failure at the same rollout twice)."""


class SessionLost(RuntimeError):
    """The engine session (its Ray actor or cluster) is gone: bring the cluster up again and resume."""


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import ray.exceptions as rex

        types += [rex.GetTimeoutError, rex.RaySystemError, rex.ObjectLostError, rex.NodeDiedError]
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    try:
        from submitit.core.utils import UncompletedJobError

        types.append(UncompletedJobError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: lost connections, timeouts, preempted or lost jobs, I/O hiccups."""
    if isinstance(exc, (PermanentFailure, SessionLost)):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ECONNRESET):
        return True
    return isinstance(exc, _transient_types())
