"""Every miles symbol and method `MilesEngine` calls, against miles itself (the miles container).

Each call is bound with `inspect.signature(...).bind(...)` in the shape `kimi_core/engines/miles/`
makes it (positional or keyword as there), so a renamed or re-shaped symbol at a new pin fails
here before a GPU run does. Marked `miles`: skipped where `import miles` fails.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest

pytestmark = pytest.mark.miles

X = object()  # a placeholder argument


def _cls(module: str, name: str) -> type:
    """The Python class behind a (possibly `@ray.remote`) class of miles."""
    obj = getattr(importlib.import_module(module), name)
    meta = getattr(obj, "__ray_metadata__", None)
    return meta.modified_class if meta is not None else obj


def _bind(fn: Any, *args: Any, **kwargs: Any) -> None:
    inspect.signature(fn).bind(*args, **kwargs)


@pytest.mark.parametrize(("module", "name", "args", "kwargs", "is_async"), [
    ("miles.utils.arguments", "parse_args", (), {}, False),
    ("miles.utils.logging_utils", "configure_logger", (X,), {"source": X}, False),
    ("miles.utils.audit_utils.process_identity", "MainProcessIdentity", (), {}, False),
    ("miles.ray.placement_group", "create_placement_groups", (X,), {}, False),
    ("miles.ray.placement_group", "create_rollout_manager", (X, X), {}, False),
    ("miles.ray.placement_group", "create_training_models", (X, X, X), {}, True),
    ("miles.utils.object_store", "init_instance", (X,), {"contribute_segment": False}, False),
    ("miles.utils.data", "remove_rollout_data_refs", (X, X), {}, False),
])
def test_the_functions_we_call(module: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                               is_async: bool) -> None:
    fn = getattr(importlib.import_module(module), name)
    _bind(fn, *args, **kwargs)
    assert inspect.iscoroutinefunction(fn) is is_async


@pytest.mark.parametrize(("method", "args", "kwargs"), [
    ("generate", (0,), {}), ("offload", (), {"tags": ["x"]}), ("onload_weights", (), {}), ("onload_kv", (), {}),
    ("eval", (0,), {}), ("save", (0,), {}), ("dispose", (), {}),
])
def test_the_rollout_manager_methods_we_call(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    _bind(getattr(_cls("miles.ray.rollout.rollout_manager", "RolloutManager"), method), X, *args, **kwargs)


@pytest.mark.parametrize(("method", "args", "kwargs"), [
    ("train", (0, X), {}), ("save_model", (0,), {"force_sync": True}), ("update_weights", (), {}),
    ("update_weights", (), {"rollout_id": 0}), ("offload", (), {}), ("clear_memory", (), {}),
])
def test_the_train_group_coroutines_we_await(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    fn = getattr(_cls("miles.ray.actor_group", "RayTrainGroup"), method)
    _bind(fn, X, *args, **kwargs)
    assert inspect.iscoroutinefunction(fn)


def test_the_constants_and_the_mlflow_flags_we_use() -> None:
    constants = importlib.import_module("sglang.srt.constants")
    for name in ("GPU_MEMORY_TYPE_CUDA_GRAPH", "GPU_MEMORY_TYPE_KV_CACHE", "GPU_MEMORY_TYPE_WEIGHTS"):
        assert isinstance(getattr(constants, name), str)
    source = inspect.getsource(importlib.import_module("miles.utils.arguments"))
    for flag in ("--use-mlflow", "--mlflow-tracking-uri", "--mlflow-experiment-name", "--mlflow-run-id",
                 "--skip-eval-before-train"):
        assert flag in source, flag
