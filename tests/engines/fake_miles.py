"""A named test double of miles @31f1ca961 behind `MilesApi` (`KIMI_GRPO_MILES_API=tests.engines.fake_miles:make_api`).

Its functions read the patched `sys.argv` as miles' `parse_args` does, write what miles writes
(`iter_*/`, the tracker, `rollout/global_dataset_state_dict_{i}.pt`), return ObjectRef-like values
resolved by its `get` and coroutines for the train group, and record every call the driver makes
with its arguments, in order (`FakeMiles.calls`). Fault switches per call name (`fail`): raise,
hang (until the engine's timeout; released at `release()`), or an actor death.

With `--use-mlflow --mlflow-run-id`, its "secondary loggers" log what miles' processes log, under
miles' names and step axes, into that MLflow run through `MlflowClient` (as miles' RolloutManager
and train main rank attach to the run by id): `generate(i)` logs `rollout/raw_reward`,
`rollout/step` and `perf/rollout_time` at step i; `train(i)` logs `train/grad_norm`, `train/loss`
and `train/step` at each optimizer sub-step `i * k + j` (k = rollout batch x samples / global
batch) and `perf/train_time` at step i; `eval(i)` logs `eval/<name>` and `eval/step` at step i.
The values are `metric_value(...)` (plus `value_offset`, so that a redone rollout logs others).

For a double in another process (the flow's Ray actor), `$KIMI_GRPO_FAKE_MILES_EXIT=I:MARKER`
makes `train(I)` end its process (a real actor death) once: when MARKER does not exist yet (it
is created first).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimi_core.engines.miles.api import MilesApi

CUDA_GRAPH, KV_CACHE, WEIGHTS = "cuda_graph", "kv_cache", "weights"  # sglang.srt.constants values
TRACKER = "latest_checkpointed_iteration.txt"
EXIT_ENV = "KIMI_GRPO_FAKE_MILES_EXIT"


def metric_value(key: str, step: int, offset: float = 0.0) -> float:
    """The value the double logs for `key` at `step` (distinct per key and step)."""
    return round((sum(map(ord, key)) % 97) / 100 + step / 1000 + offset, 6)


class FakeActorDied(RuntimeError):
    """Stands for ray.exceptions.ActorDiedError."""


class FakeMilesError(RuntimeError):
    """An error raised by a faulty fake call."""


Call = tuple[Any, ...]


@dataclass
class FakeMiles:
    calls: list[Call] = field(default_factory=list)
    faults: dict[str, list[str]] = field(default_factory=dict)
    released: threading.Event = field(default_factory=threading.Event)
    store_initialised: bool = False
    loaded_position: bytes | None = None  # what RolloutManager.load read (create_training_models)
    start_override: int | None = None  # make miles derive another first rollout (a mismatch)
    value_offset: float = 0.0  # added to every logged metric value
    args: Any = None
    _api: MilesApi | None = None

    # ---- faults -----------------------------------------------------------------------------
    def fail(self, name: str, *kinds: str) -> None:
        """The next calls of `name` (e.g. "rm.generate", "actor.train") fail with `kinds` in order:
        "raise", "hang" or "die" ("exit" for parse_args: argparse's SystemExit); "ok" lets that call pass."""
        self.faults.setdefault(name, []).extend(kinds)

    def release(self) -> None:
        self.released.set()

    def _fault(self, name: str) -> str | None:
        pending = self.faults.get(name)
        return pending.pop(0) if pending else None

    def _sync_fault(self, name: str) -> None:
        kind = self._fault(name)
        if kind == "raise":
            raise FakeMilesError(f"{name} failed")
        if kind == "die":
            raise FakeActorDied(f"the actor behind {name} died")
        if kind == "hang":
            self.released.wait(60)
            raise FakeMilesError(f"{name} hung and was released")

    async def _async_fault(self, name: str) -> None:
        kind = self._fault(name)
        if kind == "hang":
            await asyncio.sleep(3600)
        if kind is not None:
            self.faults.setdefault(name, []).insert(0, kind)
            self._sync_fault(name)

    # ---- miles ------------------------------------------------------------------------------
    def parse_args(self) -> argparse.Namespace:
        """The flags the engine's logic reads, parsed from `sys.argv` like miles' parse_args."""
        argv = list(sys.argv[1:])
        self.calls.append(("parse_args",))
        if self._fault("parse_args") == "exit":
            raise SystemExit(2)  # argparse on an unknown or bad flag
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument("--load")
        p.add_argument("--save")
        p.add_argument("--ref-load")
        p.add_argument("--hf-checkpoint")
        p.add_argument("--num-rollout", type=int)
        p.add_argument("--save-interval", type=int)
        p.add_argument("--eval-interval", type=int)
        p.add_argument("--colocate", action="store_true")
        p.add_argument("--offload-rollout-level", nargs="+", default=["kv_cache", "weight"])
        p.add_argument("--skip-eval-before-train", action="store_true")
        p.add_argument("--start-rollout-id", type=int)
        p.add_argument("--use-mlflow", action="store_true")
        p.add_argument("--mlflow-tracking-uri")
        p.add_argument("--mlflow-run-id")
        p.add_argument("--rollout-batch-size", type=int, default=1)
        p.add_argument("--n-samples-per-prompt", type=int, default=1)
        p.add_argument("--global-batch-size", type=int)
        p.add_argument("--num-steps-per-rollout", type=int)
        p.add_argument("--eval-prompt-data", nargs="+", default=[])
        args, _unknown = p.parse_known_args(argv)
        if args.num_steps_per_rollout is None:  # miles_validate_args derives it from the global batch
            samples = args.rollout_batch_size * args.n_samples_per_prompt
            args.num_steps_per_rollout = samples // args.global_batch_size if args.global_batch_size else 1
        args.eval_names = args.eval_prompt_data[0::2]
        args.argv = argv
        args.offload_train = args.offload_rollout = args.colocate  # miles_validate_args' colocate defaults
        args.use_critic = False
        # Bridge mode: no tracker under --load -> load the reference weights and start at 0.
        if args.load is None or not (Path(args.load) / TRACKER).is_file():
            args.load, args.start_rollout_id = args.ref_load or args.hf_checkpoint, 0
        self.args = args
        return args

    def configure_logger(self, args: Any, *, source: Any) -> None:
        self.calls.append(("configure_logger", source))

    def create_placement_groups(self, args: Any) -> dict[str, Any]:
        self.calls.append(("create_placement_groups",))
        self._sync_fault("create_placement_groups")
        return {"actor": "pg-actor", "rollout": "pg-rollout", "critic": None}

    def object_store_init(self, args: Any, *, contribute_segment: bool | None = None) -> object:
        assert not self.store_initialised, "object store instance is already initialized"
        self.store_initialised = True
        self.calls.append(("object_store_init", contribute_segment))
        return object()

    def create_rollout_manager(self, args: Any, pg: Any) -> tuple[FakeRolloutManager, int | None]:
        self.calls.append(("create_rollout_manager", pg))
        self._sync_fault("create_rollout_manager")
        return FakeRolloutManager(self, args), None

    async def create_training_models(self, args: Any, pgs: Any, rm: FakeRolloutManager) -> tuple[FakeTrainGroup, None]:
        self.calls.append(("create_training_models",))
        await self._async_fault("create_training_models")
        tracker = Path(args.save) / TRACKER
        loaded = int(tracker.read_text()) if tracker.is_file() and args.start_rollout_id is None else None
        if args.start_rollout_id is None:
            args.start_rollout_id = 0 if loaded is None else loaded + 1
        if self.start_override is not None:
            args.start_rollout_id = self.start_override
        position = Path(args.save) / "rollout" / f"global_dataset_state_dict_{args.start_rollout_id - 1}.pt"
        self.loaded_position = position.read_bytes() if position.is_file() else None
        return FakeTrainGroup(self, args), None

    # ---- miles' secondary loggers ---------------------------------------------------------
    def log(self, metrics: dict[str, int | None], step: int) -> None:
        """Log `metrics` (key -> the value's step, or None for `step`) at `step` to the run of
        `--mlflow-run-id`, as miles' MLflow backend does (`mlflow.log_metrics` on the attached run)."""
        args = self.args
        if args is None or not args.use_mlflow or not args.mlflow_run_id:
            return
        from mlflow import MlflowClient  # only a double that logs needs MLflow
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(step) if key.endswith("/step") else metric_value(key, step, self.value_offset),
                        now, step) for key in metrics]
        MlflowClient(tracking_uri=args.mlflow_tracking_uri).log_batch(args.mlflow_run_id, metrics=batch)

    def remove_rollout_data_refs(self, args: Any, pack: dict[str, Any]) -> None:
        self.calls.append(("remove_rollout_data_refs", pack["rollout_id"]))

    def get(self, ref: FakeRef, timeout: float | None = None) -> Any:
        return ref.resolve()

    @staticmethod
    def is_actor_death(exc: BaseException) -> bool:
        return isinstance(exc, FakeActorDied)

    @property
    def api(self) -> MilesApi:
        """One `MilesApi` per double (miles' singletons are per loaded API)."""
        if self._api is None:
            self._api = self._make_api()
        return self._api

    def _make_api(self) -> MilesApi:
        return MilesApi(
            parse_args=self.parse_args, configure_logger=self.configure_logger, MainProcessIdentity=lambda: "main",
            create_placement_groups=self.create_placement_groups, create_rollout_manager=self.create_rollout_manager,
            create_training_models=self.create_training_models, object_store_init=self.object_store_init,
            remove_rollout_data_refs=self.remove_rollout_data_refs, GPU_MEMORY_TYPE_CUDA_GRAPH=CUDA_GRAPH,
            GPU_MEMORY_TYPE_KV_CACHE=KV_CACHE, GPU_MEMORY_TYPE_WEIGHTS=WEIGHTS, get=self.get,
            is_actor_death=self.is_actor_death)

    def trace(self) -> list[Call]:
        return list(self.calls)


@dataclass
class FakeRef:
    """An ObjectRef: the call already happened (recorded); its value or error comes at `get`."""

    fake: FakeMiles
    name: str
    thunk: Callable[[], Any]

    def resolve(self) -> Any:
        self.fake._sync_fault(self.name)
        return self.thunk()


class _Method:
    def __init__(self, rm: FakeRolloutManager, name: str, body: Callable[..., Any]):
        self.rm, self.name, self.body = rm, name, body

    def remote(self, *args: Any, **kwargs: Any) -> FakeRef:
        shown = (*args, *(tuple(v) if isinstance(v, list) else v for v in kwargs.values()))
        self.rm.fake.calls.append((f"rm.{self.name}", *shown))
        return FakeRef(self.rm.fake, f"rm.{self.name}", lambda: self.body(*args, **kwargs))


class FakeRolloutManager:
    """miles/ray/rollout/rollout_manager.py: every `.remote()` returns a ref."""

    def __init__(self, fake: FakeMiles, args: Any):
        self.fake, self.args = fake, args
        self.position = 0
        for name in ("offload", "onload_weights", "onload_kv", "dispose"):
            setattr(self, name, _Method(self, name, lambda *a, **k: None))
        self.eval = _Method(self, "eval", self._eval)
        self.generate = _Method(self, "generate", self._generate)
        self.save = _Method(self, "save", self._save)

    def _generate(self, rollout_id: int) -> dict[str, Any]:
        self.position += 1
        self.fake.log({"rollout/raw_reward": None, "perf/rollout_time": None, "rollout/step": None}, rollout_id)
        return {"sample_indices": None, "data_ref": [f"box-{rollout_id}"], "rollout_id": rollout_id}

    def _eval(self, rollout_id: int) -> None:
        self.fake.log({**{f"eval/{name}": None for name in self.args.eval_names}, "eval/step": None}, rollout_id)

    def _save(self, rollout_id: int) -> None:
        path = Path(self.args.save) / "rollout" / f"global_dataset_state_dict_{rollout_id}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"sample_offset={self.position}".encode())


class FakeTrainGroup:
    """miles/ray/actor_group.py: every method is a coroutine."""

    def __init__(self, fake: FakeMiles, args: Any):
        self.fake, self.args = fake, args

    async def _call(self, name: str, *shown: Any) -> None:
        self.fake.calls.append((f"actor.{name}", *shown))
        await self.fake._async_fault(f"actor.{name}")

    async def train(self, rollout_id: int, pack: dict[str, Any]) -> list[str]:
        assert pack["rollout_id"] == rollout_id
        await self._call("train", rollout_id)
        exit_at, _, marker = os.environ.get(EXIT_ENV, "").partition(":")
        if exit_at == str(rollout_id) and marker and not Path(marker).exists():
            Path(marker).touch()
            os._exit(17)  # the actor's process dies mid-rollout, as a crashed miles driver would
        k = self.args.num_steps_per_rollout
        for j in range(k):
            self.fake.log({"train/grad_norm": None, "train/loss": None, "train/step": None}, rollout_id * k + j)
        self.fake.log({"perf/train_time": None}, rollout_id)
        return ["normal"]

    async def save_model(self, rollout_id: int, force_sync: bool = False) -> None:
        await self._call("save_model", rollout_id, force_sync)
        out = Path(self.args.save) / f"iter_{rollout_id:07d}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "common.pt").write_bytes(b"weights")
        (Path(self.args.save) / TRACKER).write_text(str(rollout_id))

    async def update_weights(self, rollout_id: int | None = None) -> None:
        await self._call("update_weights", rollout_id)

    async def offload(self) -> None:
        await self._call("offload")

    async def clear_memory(self) -> None:
        await self._call("clear_memory")


#: Set by a test before the engine starts; `make_api` hands out its API (else a fresh double).
CURRENT: FakeMiles | None = None


_DEFAULT = FakeMiles()


def make_api() -> MilesApi:
    """The `$KIMI_GRPO_MILES_API` factory: the API of `CURRENT`, else of one module-wide double."""
    return (CURRENT if CURRENT is not None else _DEFAULT).api
