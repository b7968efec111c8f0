"""The one import point of miles (docs/design.md §5): exactly the callables `MilesEngine` uses.

`load_miles_api()` imports miles, SGLang's memory tags and Ray when it is called, never at import
time, so the flow, the CLI and `make_engine` stay free of them. With
`$KIMI_GRPO_MILES_API=module:factory` it calls that factory instead (the test double
`tests/engines/fake_miles.py`). Names and signatures follow miles @31f1ca961:

| field | miles @31f1ca961 |
|---|---|
| `parse_args()` | `miles/utils/arguments.py::parse_args` (reads `sys.argv`) |
| `configure_logger(args, *, source)` | `miles/utils/logging_utils.py` |
| `MainProcessIdentity()` | `miles/utils/audit_utils/process_identity.py` |
| `create_placement_groups(args)` | `miles/ray/placement_group.py` (sync, blocks on the PG) |
| `create_rollout_manager(args, pg) -> (rm, num_rollout_per_epoch)` | `miles/ray/placement_group.py` (sync) |
| `create_training_models(args, pgs, rm) -> (actor, critic)` | `miles/ray/placement_group.py` (async) |
| `object_store_init(args, *, contribute_segment)` | `miles/utils/object_store.py::init_instance` |
| `remove_rollout_data_refs(args, pack)` | `miles/utils/data.py` |
| `GPU_MEMORY_TYPE_*` | `sglang.srt.constants` |
| `get(ref, *, timeout)` | `ray.get`: the value of a RolloutManager call's ObjectRef |
| `is_actor_death(exc)` | `isinstance(exc, ray.exceptions.RayActorError)` (`ActorDiedError` included) |
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

#: Environment variable naming a `module:factory` that returns a `MilesApi` (a test double).
API_ENV = "KIMI_GRPO_MILES_API"


@dataclass(frozen=True)
class MilesApi:
    """What the engine calls in miles, and nothing else (see the module docstring)."""

    parse_args: Callable[[], Any]
    configure_logger: Callable[..., None]
    MainProcessIdentity: Callable[[], Any]
    create_placement_groups: Callable[[Any], Any]
    create_rollout_manager: Callable[[Any, Any], tuple[Any, int | None]]
    create_training_models: Callable[[Any, Any, Any], Coroutine[Any, Any, tuple[Any, Any]]]
    object_store_init: Callable[..., Any]
    remove_rollout_data_refs: Callable[[Any, Any], None]
    GPU_MEMORY_TYPE_CUDA_GRAPH: str
    GPU_MEMORY_TYPE_KV_CACHE: str
    GPU_MEMORY_TYPE_WEIGHTS: str
    get: Callable[..., Any]
    is_actor_death: Callable[[BaseException], bool]


def api_override() -> str | None:
    """`$KIMI_GRPO_MILES_API` when set (a `module:factory` test double), else None."""
    return os.environ.get(API_ENV) or None


def load_miles_api() -> MilesApi:
    """The miles API: the factory named by `$KIMI_GRPO_MILES_API`, else miles itself (imported now)."""
    override = api_override()
    if override is not None:
        module_name, sep, factory_name = override.partition(":")
        if not sep or not module_name or not factory_name:
            raise ValueError(f"${API_ENV}={override!r}: expected 'module:factory'")
        factory = getattr(importlib.import_module(module_name), factory_name)
        api = factory()
        if not isinstance(api, MilesApi):
            raise TypeError(f"${API_ENV}={override!r} returned {type(api).__name__}, not MilesApi")
        return api
    return _real_api()


@functools.cache
def _real_api() -> MilesApi:
    """miles @31f1ca961, imported by name so nothing imports it statically (the engine's process only)."""
    constants = importlib.import_module("sglang.srt.constants")
    placement = importlib.import_module("miles.ray.placement_group")
    object_store = importlib.import_module("miles.utils.object_store")
    arguments = importlib.import_module("miles.utils.arguments")
    identity = importlib.import_module("miles.utils.audit_utils.process_identity")
    data = importlib.import_module("miles.utils.data")
    logging_utils = importlib.import_module("miles.utils.logging_utils")
    ray = importlib.import_module("ray")
    ray_exceptions = importlib.import_module("ray.exceptions")
    actor_error: type[BaseException] = ray_exceptions.RayActorError

    def is_actor_death(exc: BaseException) -> bool:
        return isinstance(exc, actor_error)

    return MilesApi(
        parse_args=arguments.parse_args,
        configure_logger=logging_utils.configure_logger,
        MainProcessIdentity=identity.MainProcessIdentity,
        create_placement_groups=placement.create_placement_groups,
        create_rollout_manager=placement.create_rollout_manager,
        create_training_models=placement.create_training_models,
        object_store_init=object_store.init_instance,
        remove_rollout_data_refs=data.remove_rollout_data_refs,
        GPU_MEMORY_TYPE_CUDA_GRAPH=constants.GPU_MEMORY_TYPE_CUDA_GRAPH,
        GPU_MEMORY_TYPE_KV_CACHE=constants.GPU_MEMORY_TYPE_KV_CACHE,
        GPU_MEMORY_TYPE_WEIGHTS=constants.GPU_MEMORY_TYPE_WEIGHTS,
        get=ray.get,
        is_actor_death=is_actor_death,
    )
