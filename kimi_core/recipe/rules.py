"""Cross-field rules of a recipe, checked at load. Each problem names the fields and the rule."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from kimi_core.recipe.sections import RUN_DIR, Recipe

Rule = Callable[[Recipe], Iterator[str]]

_URL_SCHEMES = ("file", "s3", "hf", "gs", "gcs", "az", "abfs", "http", "https", "memory", "synthetic")


def parallel_layout(r: Recipe) -> Iterator[str]:
    p, world = r.parallel, r.world_size
    model_parallel = p.tensor * p.pipeline * p.context
    if world % model_parallel:
        yield (
            f"parallel.tensor x parallel.pipeline x parallel.context = {p.tensor} x {p.pipeline} x {p.context} "
            f"= {model_parallel} must divide the world size cluster.num_nodes x cluster.gpus_per_node = {world} "
            "(rule: TP x PP x CP x DP = nodes x GPUs per node)"
        )
    expert_parallel = p.expert * p.expert_tensor * p.pipeline
    if world % expert_parallel:
        yield (
            f"parallel.expert x parallel.expert_tensor x parallel.pipeline = {p.expert} x {p.expert_tensor} x "
            f"{p.pipeline} = {expert_parallel} must divide the world size {world}"
        )
    experts = r.model.architecture.n_routed_experts
    if experts % p.expert:
        yield f"model.architecture.n_routed_experts = {experts} must be divisible by parallel.expert = {p.expert}"
    if p.sequence_parallel and p.tensor == 1:
        yield "parallel.sequence_parallel needs parallel.tensor > 1"


def pipeline_layers(r: Recipe) -> Iterator[str]:
    layers, pp = r.model.architecture.num_hidden_layers, r.parallel.pipeline
    last = r.parallel.decoder_last_pipeline_num_layers
    if last is None:
        if layers % pp:
            yield (
                f"model.architecture.num_hidden_layers = {layers} is not divisible by parallel.pipeline = {pp}; "
                "set parallel.decoder_last_pipeline_num_layers"
            )
        return
    if pp == 1:
        if last != layers:
            yield f"parallel.decoder_last_pipeline_num_layers = {last} must equal the {layers} layers when parallel.pipeline = 1"
        return
    rest = layers - last
    if rest <= 0 or rest % (pp - 1):
        yield (
            f"parallel.decoder_last_pipeline_num_layers = {last}: the other {rest} of "
            f"model.architecture.num_hidden_layers = {layers} must split evenly over the first "
            f"parallel.pipeline - 1 = {pp - 1} stages (e.g. 61 layers, PP 8, last 5 -> 7 stages of 8)"
        )


def batch_arithmetic(r: Recipe) -> Iterator[str]:
    ro = r.rollout
    samples = ro.rollout_batch_size * ro.n_samples_per_prompt
    gbs, steps = ro.global_batch_size, ro.num_steps_per_rollout
    if gbs is not None and steps is not None and gbs * steps != samples:
        yield (
            f"rollout.rollout_batch_size x rollout.n_samples_per_prompt = {samples} must equal "
            f"rollout.global_batch_size x rollout.num_steps_per_rollout = {gbs} x {steps}"
        )
    elif gbs is not None and samples % gbs:
        yield (
            f"rollout.global_batch_size = {gbs} must divide rollout.rollout_batch_size x "
            f"rollout.n_samples_per_prompt = {samples} (num_steps_per_rollout is derived from it)"
        )
    elif steps is not None and samples % steps:
        yield (
            f"rollout.num_steps_per_rollout = {steps} must divide rollout.rollout_batch_size x "
            f"rollout.n_samples_per_prompt = {samples} (global_batch_size is derived from it)"
        )
    over = ro.over_sampling_batch_size
    if over is not None and over < ro.rollout_batch_size:
        yield (
            f"rollout.over_sampling_batch_size = {over} must be >= rollout.rollout_batch_size = "
            f"{ro.rollout_batch_size}"
        )
    if ro.dynamic_sampling_filter is not None and over is None:
        yield "rollout.dynamic_sampling_filter needs rollout.over_sampling_batch_size"
    if ro.dynamic_sampling_filter == "nonzero_std" and ro.n_samples_per_prompt < 2:
        yield "rollout.dynamic_sampling_filter 'nonzero_std' needs rollout.n_samples_per_prompt >= 2"


def rollout_engines(r: Recipe) -> Iterator[str]:
    if r.cluster.accelerator == "cpu":
        return
    sg, world = r.sglang, r.world_size
    if world % sg.gpus_per_engine:
        yield (
            f"sglang.gpus_per_engine = {sg.gpus_per_engine} must divide the rollout GPUs "
            f"(colocated: the world size {world})"
        )
    if sg.ep_size > sg.gpus_per_engine:
        yield f"sglang.ep_size = {sg.ep_size} must be <= sglang.gpus_per_engine = {sg.gpus_per_engine}"
    if sg.dp_size is not None and sg.gpus_per_engine % sg.dp_size:
        yield f"sglang.dp_size = {sg.dp_size} must divide sglang.gpus_per_engine = {sg.gpus_per_engine}"
    if sg.enable_dp_attention and sg.dp_size is None:
        yield "sglang.enable_dp_attention needs sglang.dp_size"


def cluster_shape(r: Recipe) -> Iterator[str]:
    c = r.cluster
    if c.accelerator == "gpu" and c.gpus_per_node == 0:
        yield "cluster.gpus_per_node must be > 0 when cluster.accelerator is 'gpu'"
    if c.executor == "slurm" and not c.partition:
        yield "cluster.partition is required when cluster.executor is 'slurm' (use a profile: --cluster NAME)"
    if c.executor == "slurm":
        yield from c.ray.layout_problems(c.num_nodes)


def intervals_and_saving(r: Recipe) -> Iterator[str]:
    ck = r.checkpoint
    if ck.save_interval is not None and ck.save is None:
        yield f"checkpoint.save_interval = {ck.save_interval} requires checkpoint.save (a path or '{RUN_DIR}')"
    if r.eval.interval is not None and not r.eval.datasets:
        yield "eval.interval is set but eval.datasets is empty"
    if r.eval.datasets and r.eval.interval is None and not r.eval.before_train:
        yield "eval.datasets are given but neither eval.interval nor eval.before_train runs them"
    names = [d.name for d in r.eval.datasets]
    if len(names) != len(set(names)):
        yield f"eval.datasets names must be unique, got {names}"
    if r.grpo.kl_loss_coef > 0 and not r.grpo.use_kl_loss:
        yield "grpo.kl_loss_coef > 0 needs grpo.use_kl_loss: true"
    if r.grpo.eps_clip >= 1:
        yield f"grpo.eps_clip = {r.grpo.eps_clip} must be in (0, 1)"


def local_model(r: Recipe) -> Iterator[str]:
    building = r.checkpoint.hf_checkpoint.startswith("build:")
    if building and r.model.warmup is None:
        yield f"checkpoint.hf_checkpoint = {r.checkpoint.hf_checkpoint!r} needs a model.warmup section"
    if r.model.warmup is not None and not r.model.warmup.source.startswith("synthetic://"):
        yield "model.warmup.source must be a synthetic:// source (worked examples are generated from it)"


def multi_node_tracking(r: Recipe) -> Iterator[str]:
    """Several GPU nodes need an MLflow tracking server: a sqlite file on the shared filesystem is
    written by processes on different nodes, and sqlite's locking does not hold over NFS/Lustre.

    Only an explicit value is judged here: when `tracking.tracking_uri` is unset the run takes
    `$MLFLOW_TRACKING_URI` at run time (which the recipe cannot see) and falls back to the sqlite file.
    """
    uri = r.tracking.tracking_uri
    if r.cluster.accelerator != "gpu" or r.cluster.num_nodes <= 1 or uri is None:
        return
    if not uri.startswith(("http://", "https://")):
        yield (
            f"tracking.tracking_uri = {uri!r}: cluster.num_nodes = {r.cluster.num_nodes} GPU nodes need an MLflow "
            "tracking server, not a file on the shared filesystem; set tracking.tracking_uri: http://host:5000 "
            "or pass --set tracking.tracking_uri=http://host:5000 (or leave it unset and export MLFLOW_TRACKING_URI)"
        )


def path_problem(value: str) -> str | None:
    """Why `value` is not a well-formed recipe path, or None."""
    if not value.strip() or value != value.strip():
        return "is empty or has surrounding whitespace"
    if "$" in value or "{" in value or value.startswith("~"):
        return "uses templating ($VAR, {...}, ~); recipes have none: use a path relative to cluster.base_dir"
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", value)
    if match and match.group(1) not in _URL_SCHEMES:
        return f"has an unsupported URL scheme '{match.group(1)}' (supported: {', '.join(_URL_SCHEMES)})"
    if "\n" in value or "\x00" in value:
        return "contains a newline or NUL"
    return None


def paths(r: Recipe) -> Iterator[str]:
    candidates = {
        "checkpoint.hf_checkpoint": r.checkpoint.hf_checkpoint,
        "checkpoint.ref_load": r.checkpoint.ref_load,
        "checkpoint.load": r.checkpoint.load,
        "checkpoint.save": r.checkpoint.save,
        "data.prompt_data": r.data.prompt_data,
        "cluster.base_dir": r.cluster.base_dir,
        **{f"eval.datasets[{d.name}].path": d.path for d in r.eval.datasets},
    }
    for key, value in candidates.items():
        if value is not None and (why := path_problem(value)):
            yield f"{key} = {value!r} {why}"


RULES: tuple[Rule, ...] = (
    parallel_layout,
    pipeline_layers,
    batch_arithmetic,
    rollout_engines,
    cluster_shape,
    intervals_and_saving,
    local_model,
    multi_node_tracking,
    paths,
)


def check_rules(recipe: Recipe) -> list[str]:
    """Every cross-field problem of `recipe` (empty when it is valid)."""
    return [problem for rule in RULES for problem in rule(recipe)]
