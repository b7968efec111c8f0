"""Fault seam: named points in the real code where a test may inject a failure.

`fault_point(name, **context)` does nothing unless a hook is installed. A hook is any callable
`hook(name: str, **context) -> None`; it may return (no fault), raise (a transient or permanent
error), sleep, or kill the process. It is installed either

- in-process: `install_fault_hook(fn)` or, scoped, `with fault_hook(fn): ...` (tests); or
- for another process (a Ray actor, a CLI subprocess): the environment variable
  `KIMI_GRPO_FAULT_HOOK="module:function"` (`FAULT_HOOK_ENV`) names the hook, which is imported
  lazily, once per process (and per distinct value of the variable), at the first fault point.

An in-process hook takes precedence over the environment's. The points the engine exposes:

- `"train.mid"` (context: `rollout_id`, `paths`): after sampling a rollout, before its optimizer steps;
- `"save.mid"` (context: `rollout_id`, `paths`): halfway through writing a checkpoint, after the
  model files and before the optimizer file (the checkpoint is not committed yet).

`paths` is the run's `kimi_core.run_state.RunPaths`. The test-only behaviours (kill, pause, raise
once) live with the tests, not here.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Iterator
from typing import Any, Protocol

#: Environment variable: `module:function` of the fault hook of this process (unset: no hook).
FAULT_HOOK_ENV = "KIMI_GRPO_FAULT_HOOK"


class FaultHook(Protocol):
    """Called at each fault point with its name and context."""

    def __call__(self, name: str, **context: Any) -> None: ...


_installed: FaultHook | None = None
_from_env: tuple[str, FaultHook] | None = None  # (the variable's value, the hook it names)
_lock = threading.Lock()


def fault_point(name: str, **context: Any) -> None:
    """Call the installed hook (in-process, else `$KIMI_GRPO_FAULT_HOOK`) with `name` and `context`;
    a no-op when there is none. Whatever the hook raises propagates to the caller."""
    hook = _installed if _installed is not None else _env_hook()
    if hook is not None:
        hook(name, **context)


def install_fault_hook(hook: FaultHook | None) -> FaultHook | None:
    """Install `hook` in this process (None uninstalls); return the previously installed one."""
    global _installed
    previous, _installed = _installed, hook
    return previous


@contextlib.contextmanager
def fault_hook(hook: FaultHook) -> Iterator[FaultHook]:
    """Install `hook` for the duration of the `with` block, then restore the previous one."""
    previous = install_fault_hook(hook)
    try:
        yield hook
    finally:
        install_fault_hook(previous)


def load_hook(spec: str) -> FaultHook:
    """Import the callable named by `module:function` (the function may be a dotted attribute path)."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"${FAULT_HOOK_ENV}={spec!r}: expected 'module:function'")
    target: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        target = getattr(target, attr)
    if not callable(target):
        raise TypeError(f"${FAULT_HOOK_ENV}={spec!r} names {type(target).__name__}, not a callable")
    hook: FaultHook = target  # a callable; its signature is the hook's contract
    return hook


def _env_hook() -> FaultHook | None:
    """The hook named by `$KIMI_GRPO_FAULT_HOOK`, imported on first use and cached."""
    global _from_env  # noqa: PLW0603 - the process's one hook from the environment, loaded once
    spec = os.environ.get(FAULT_HOOK_ENV, "")
    if not spec:
        return None
    cached = _from_env
    if cached is not None and cached[0] == spec:
        return cached[1]
    with _lock:
        if _from_env is None or _from_env[0] != spec:
            _from_env = (spec, load_hook(spec))
        return _from_env[1]
