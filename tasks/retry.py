"""Retry policy shared by the tasks: only transient failures are retried (docs/design.md §4)."""

from __future__ import annotations

from typing import Any

from kimi_core.runtime.failures import is_transient


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry when the failure is transient, never for permanent ones."""
    try:
        state.result()
    except BaseException as exc:
        return is_transient(exc)
    return False
