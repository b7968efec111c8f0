"""`RunPlan`: values derived from a recipe (never written back into it)."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from kimi_core.recipe.sections import RUN_DIR, Recipe
from kimi_core.run_state import CHECKPOINTS_DIR, run_path


@dataclass(frozen=True)
class RunPlan:
    """What a recipe means in numbers: parallel sizes, batch arithmetic and the schedule."""

    world_size: int
    data_parallel: int
    expert_data_parallel: int
    layers_per_stage: tuple[int, ...]
    num_sglang_engines: int
    samples_per_rollout: int
    global_batch_size: int
    steps_per_rollout: int
    num_rollout: int
    dataset_rows: int | None
    rollouts_per_epoch: int | None
    eval_before_train: bool
    eval_after: tuple[int, ...]
    save_after: tuple[int, ...]

    def is_eval_due(self, rollout_id: int) -> bool:
        return rollout_id in self.eval_after

    def is_save_due(self, rollout_id: int) -> bool:
        return rollout_id in self.save_after


def layers_per_stage(num_layers: int, pipeline: int, last: int | None) -> tuple[int, ...]:
    """Decoder layers of each pipeline stage (61, PP 8, last 5 -> (8,)*7 + (5,))."""
    if last is None or pipeline == 1:
        return (num_layers // pipeline,) * pipeline
    return ((num_layers - last) // (pipeline - 1),) * (pipeline - 1) + (last,)


def eval_schedule(*, num_rollout: int, interval: int | None) -> tuple[int, ...]:
    """Rollout ids after which eval runs: `(rollout_id + 1) % interval == 0` (docs/design.md §4)."""
    if interval is None:
        return ()
    return tuple(r for r in range(num_rollout) if (r + 1) % interval == 0)


def save_schedule(*, num_rollout: int, interval: int | None, enabled: bool) -> tuple[int, ...]:
    """Rollout ids after which a checkpoint is saved: every `interval`, and always the last one."""
    if not enabled:
        return ()
    due = {r for r in range(num_rollout) if interval is not None and (r + 1) % interval == 0}
    return tuple(sorted(due | {num_rollout - 1}))


def plan_run(recipe: Recipe, *, dataset_rows: int | None = None) -> RunPlan:
    """Derive the plan of `recipe`; `dataset_rows` (prepared training rows) gives rollouts per epoch."""
    p, ro = recipe.parallel, recipe.rollout
    world = recipe.world_size
    samples = ro.rollout_batch_size * ro.n_samples_per_prompt
    if ro.global_batch_size is not None:
        gbs, steps = ro.global_batch_size, samples // ro.global_batch_size
    else:
        steps = ro.num_steps_per_rollout or 1
        gbs = samples // steps
    engines = 1 if recipe.cluster.accelerator == "cpu" else world // recipe.sglang.gpus_per_engine
    return RunPlan(
        world_size=world,
        data_parallel=world // (p.tensor * p.pipeline * p.context),
        expert_data_parallel=world // (p.expert * p.expert_tensor * p.pipeline),
        layers_per_stage=layers_per_stage(
            recipe.model.architecture.num_hidden_layers, p.pipeline, p.decoder_last_pipeline_num_layers
        ),
        num_sglang_engines=engines,
        samples_per_rollout=samples,
        global_batch_size=gbs,
        steps_per_rollout=steps,
        num_rollout=ro.num_rollout,
        dataset_rows=dataset_rows,
        rollouts_per_epoch=None if dataset_rows is None else max(dataset_rows // ro.rollout_batch_size, 1),
        eval_before_train=recipe.eval.before_train and bool(recipe.eval.datasets),
        eval_after=eval_schedule(num_rollout=ro.num_rollout, interval=recipe.eval.interval),
        save_after=save_schedule(
            num_rollout=ro.num_rollout,
            interval=recipe.checkpoint.save_interval,
            enabled=recipe.checkpoint.save is not None,
        ),
    )


def resolve_path(recipe: Recipe, value: str, *, run_name: str | None = None) -> str:
    """A recipe path made concrete: URLs and absolute paths as given, others under `cluster.base_dir`.

    `checkpoint.save: run_dir` becomes the run's checkpoints dir (`kimi_core.run_state.run_path`,
    `{base_dir}/runs/{run_name}/checkpoints`). Without a base dir
    the result keeps a visible `<base_dir>` placeholder (for display only).
    """
    base = recipe.cluster.base_dir or "<base_dir>"
    if value == RUN_DIR:
        return run_path(base, run_name or "<run_name>", CHECKPOINTS_DIR)
    if "://" in value or value.startswith("/") or value.startswith("build:"):
        return value
    return posixpath.join(base, value)
