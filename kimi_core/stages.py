"""The job-shaped stages: prepare data, acquire the model, convert checkpoints (docs/design.md §3).

Each returns a small JSON-able dict (paths, counts, hashes, and `cached`) and is safe to run again:
it checks the content of its inputs against its earlier output (source bytes, checkpoint shards)
and returns at once with `cached: true` when nothing changed. This module imports neither torch
nor megatron (torch only when a base model is built or a conversion has work to do), so a stage
job whose output is current finishes in about a second.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kimi_core.atomic import write_text_atomic
from kimi_core.checkpoint.cache import ConversionKey, ConversionResult, Mode, conversion_key, lookup_conversion
from kimi_core.checkpoint.hf import verify_hf_checkpoint
from kimi_core.data import PREP_VERSION, PrepResult, find_prepared, prepare_dataset
from kimi_core.engines.base import EngineInputs, TrackingTarget
from kimi_core.recipe import Recipe, resolve_path
from kimi_core.run_state import TRACKER_FILENAME, RunPaths
from kimi_core.tokenizer import KimiByteTokenizer

BUILD_PREFIX = "build:"
WARMUP_VERSION = "1"


def _local(path: str) -> str:
    return path.removeprefix("file://")


def _data_sets(recipe: Recipe) -> dict[str, str]:
    """Prepared name -> source of the training set and each eval set."""
    return {"train": resolve_path(recipe, recipe.data.prompt_data),
            **{f"eval-{ds.name}": resolve_path(recipe, ds.path) for ds in recipe.eval.datasets}}


def _prep_args(recipe: Recipe, paths: RunPaths) -> dict[str, Any]:
    d = recipe.data
    count_tokens = None
    if recipe.model.tokenizer == "kimi-byte":
        tokenizer = KimiByteTokenizer()
        count_tokens = lambda messages: len(tokenizer.apply_chat_template(messages, tokenize=True))  # noqa: E731
    return dict(out_dir=str(paths.data), input_key=d.input_key, label_key=d.label_key, metadata_key=d.metadata_key,
                on_error=d.on_error, count_tokens=count_tokens)


def prepare_data(recipe: Recipe, paths: RunPaths) -> dict[str, Any]:
    """Validate, deduplicate and cache the training and eval sets under `{run}/data/`."""
    args = _prep_args(recipe, paths)
    return _data_result(recipe, {name: prepare_dataset(source, name=name, **args)
                                 for name, source in _data_sets(recipe).items()})


def current_data(recipe: Recipe, paths: RunPaths) -> dict[str, Any] | None:
    """`prepare_data`'s result when every set's earlier output is current, else None (writes nothing)."""
    args = _prep_args(recipe, paths)
    done = {}
    for name, source in _data_sets(recipe).items():
        found = find_prepared(source, name=name, **args)
        if found is None:
            return None  # the job prepares it (the sets after this one are not hashed twice)
        done[name] = found
    return _data_result(recipe, done)


def _data_result(recipe: Recipe, prepared: dict[str, PrepResult]) -> dict[str, Any]:
    train = prepared["train"]
    evals = {ds.name: prepared[f"eval-{ds.name}"] for ds in recipe.eval.datasets}
    return {
        "cached": train.cached and all(r.cached for r in evals.values()),
        "prep_version": PREP_VERSION,
        "train": {"path": str(train.path), "rows": train.rows_out, "sha256": train.output_sha256,
                  "cached": train.cached, "errors": train.errors, "duplicates": train.duplicates},
        "eval": {name: {"path": str(r.path), "rows": r.rows_out, "sha256": r.output_sha256} for name, r in evals.items()},
    }


def _base_model_dir(recipe: Recipe) -> Path:
    key = json.dumps({"arch": recipe.model.architecture.model_dump(), "warmup": recipe.model.model_dump()["warmup"],
                      "version": WARMUP_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(resolve_path(recipe, f"models/{recipe.model.name}-base-{digest}"))


def acquire_model(recipe: Recipe, paths: RunPaths) -> dict[str, Any]:
    """Production: verify the HF checkpoints under base_dir. Local (`build:tiny`): build the base
    model once per architecture + warm-up spec, shared by every run under the same base dir."""
    source = recipe.checkpoint.hf_checkpoint
    if not source.startswith(BUILD_PREFIX):
        info = verify_hf_checkpoint(_local(resolve_path(recipe, source)))
        return {"hf_checkpoint": info.path, "num_tensors": info.num_tensors, "bytes": info.total_bytes, "built": False,
                "cached": False}
    if source != "build:tiny":
        raise ValueError(f"checkpoint.hf_checkpoint = {source!r}: the only build target is 'build:tiny'")
    built = current_model(recipe, paths)
    if built is not None:
        return built
    assert recipe.model.warmup is not None  # checked by the recipe rules
    target = _base_model_dir(recipe)
    from kimi_core.model.warmup import build_base_model  # noqa: PLC0415 - torch only when the model is built

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        stats = build_base_model(recipe.model.architecture, tmp, spec=recipe.model.warmup)
        write_text_atomic(tmp / "warmup.json", json.dumps(stats))
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = verify_hf_checkpoint(target)
    return {"hf_checkpoint": str(target), "num_tensors": info.num_tensors, "built": True, "cached": False, **stats}


def current_model(recipe: Recipe, paths: RunPaths) -> dict[str, Any] | None:
    """`acquire_model`'s result for a `build:` model already built (and verified), else None: a
    production checkpoint is verified by the stage itself."""
    if recipe.checkpoint.hf_checkpoint != "build:tiny":
        return None
    target = _base_model_dir(recipe)
    marker = target / "warmup.json"
    if not marker.is_file():
        return None
    info = verify_hf_checkpoint(target)
    return {"hf_checkpoint": str(target), "num_tensors": info.num_tensors, "built": False, "cached": True,
            **json.loads(marker.read_text())}


@dataclass(frozen=True)
class _Conversion:
    """A conversion to make or to find done: its mode, source, destination and content key."""

    mode: Mode
    src: Path
    dst: str
    key: ConversionKey

    def lookup(self) -> ConversionResult | None:
        return lookup_conversion(self.key, src=self.src, dst=Path(self.dst).resolve(), start=time.monotonic())

    def result(self, done: ConversionResult) -> dict[str, Any]:
        return {"conversions": [asdict(done)], "ref_load": self.dst, "cached": done.cached}


def _plan_conversion(recipe: Recipe, *, hf_checkpoint: str) -> dict[str, Any] | _Conversion:
    """The stage's result when there is nothing to convert (no reference asked for, or one present),
    else the conversion (torch-free: its key hashes the inputs once, for the lookup and the work)."""
    ref = recipe.checkpoint.ref_load
    if ref is None:
        return {"conversions": [], "cached": True, "reason": "checkpoint.ref_load is not set: nothing to convert"}
    dst = _local(resolve_path(recipe, ref))
    if dst.rstrip("/").endswith("torch_dist"):
        if recipe.checkpoint.actor_format in ("fp8", "int4"):
            if Path(dst, TRACKER_FILENAME).is_file():
                return {"conversions": [], "ref_load": dst, "cached": True,
                        "reason": "torch_dist reference already present"}
            raise NotImplementedError(
                f"converting a {recipe.checkpoint.actor_format} HF checkpoint to torch_dist needs its BF16 copy first; "
                f"provide {dst} (e.g. with miles' tools/convert_hf_to_torch_dist.py from a BF16 checkpoint)"
            )
        mode: Mode = "hf_to_torch_dist"
    elif recipe.checkpoint.actor_format == "int4":
        mode = "int4_to_bf16"
    else:
        verify_hf_checkpoint(dst)
        return {"conversions": [], "ref_load": dst, "cached": False, "reason": "HF reference present and verified"}
    src = Path(hf_checkpoint).resolve()
    return _Conversion(mode=mode, src=src, dst=dst, key=conversion_key(mode=mode, src=src))


def convert_checkpoint(recipe: Recipe, paths: RunPaths, *, hf_checkpoint: str) -> dict[str, Any]:
    """Make the reference / initial weights the recipe names in `checkpoint.ref_load`.

    A `*_torch_dist` reference is converted from the HF actor checkpoint (HF -> Megatron
    torch_dist); a BF16 HF reference of an INT4 actor is dequantized from it (INT4 -> BF16).
    An existing, verified output is reused (the conversion is cached by content hash).
    """
    plan = _plan_conversion(recipe, hf_checkpoint=hf_checkpoint)
    if isinstance(plan, dict):
        return plan
    done = plan.lookup()
    if done is None:
        from kimi_core.checkpoint.stage import convert_stage  # noqa: PLC0415 - torch and megatron: only when there is work

        done = convert_stage(mode=plan.mode, src=hf_checkpoint, dst=plan.dst, key=plan.key)
    return plan.result(done)


def current_conversion(recipe: Recipe, paths: RunPaths, *, hf_checkpoint: str) -> dict[str, Any] | None:
    """`convert_checkpoint`'s result when there is nothing to do (its output is current), else None."""
    plan = _plan_conversion(recipe, hf_checkpoint=hf_checkpoint)
    if isinstance(plan, dict):
        return plan if plan["cached"] else None
    done = plan.lookup()
    return None if done is None else plan.result(done)


def engine_inputs(data: dict[str, Any], model: dict[str, Any], converted: dict[str, Any] | None = None, *,
                  tracking: TrackingTarget | None = None) -> EngineInputs:
    """What the engine reads, from the results of `prepare_data`, `acquire_model` and
    `convert_checkpoint` (its `ref_load`, when it made one), and the MLflow run a self-logging
    engine logs into."""
    return EngineInputs(train_data=data["train"]["path"],
                        eval_data={name: e["path"] for name, e in data["eval"].items()},
                        initial_checkpoint=model["hf_checkpoint"],
                        reference_checkpoint=(converted or {}).get("ref_load"), tracking=tracking)
