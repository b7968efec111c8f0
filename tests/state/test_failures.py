"""Failure classes: what a stage's real submitit job reports decides whether it is retried."""

from __future__ import annotations

from pathlib import Path

import pytest
import submitit

from kimi_core.runtime.failures import PermanentFailure, SessionLost, is_transient, job_error_class, job_error_line


def _bad_row() -> None:
    raise ValueError("data.jsonl:2: label under key 'label' must be a string")


def _lost_connection() -> None:
    raise ConnectionResetError("peer reset the connection")


def _job_error(fn, tmp_path: Path) -> BaseException:
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="local")
    executor.update_parameters(timeout_min=2)
    job = executor.submit(fn)
    with pytest.raises(submitit.core.utils.FailedJobError) as info:
        job.result()
    return info.value


@pytest.mark.timeout(120)
def test_a_job_that_raised_bad_data_is_permanent_and_a_lost_connection_is_transient(tmp_path: Path) -> None:
    bad = _job_error(_bad_row, tmp_path / "bad")
    assert job_error_class(str(bad)) == "ValueError"
    assert job_error_line(str(bad)) == "ValueError: data.jsonl:2: label under key 'label' must be a string"
    assert not is_transient(bad)
    lost = _job_error(_lost_connection, tmp_path / "lost")
    assert job_error_class(str(lost)) == "ConnectionResetError"
    assert is_transient(lost)


def test_classes() -> None:
    assert is_transient(ConnectionError("x")) and is_transient(TimeoutError("x"))
    assert not is_transient(ValueError("x")) and not is_transient(PermanentFailure("x"))
    assert not is_transient(SessionLost("x"))  # handled by a new bring-up, not by a task retry
    assert is_transient(submitit.core.utils.UncompletedJobError("job 7 has not produced any output"))
    trace = "Traceback (most recent call last):\n  File \"x.py\", line 1\nkimi.Bad: it broke\n\n-----\nYou can check full logs at:\n - /x/y.err\n"
    assert job_error_class(trace) == "Bad"
