"""Render a recipe as the miles `train.py` flag list (audit and interop with the reference framework).

One flag per line, grouped like the reference launchers' flag strings. Paths use `$BASE_DIR` unless
the recipe has a base dir. Flags follow miles @31f1ca961: the launchers `scripts/run_kimi_k25.py` and
`scripts/run_kimi_k2.py`, and the model shapes `scripts/models/kimi-k25.py` (which reuses
`kimi-k2-thinking.py` with `beta_fast=32`), `kimi-k2-thinking.py` and `kimi-k2.py`. A flag passed by
both a model script and a launcher (`--attention-softmax-in-fp32`) is rendered once, in MISC_ARGS; a
launcher override of a model flag (`--moe-token-dispatcher-type flex` for Kimi-K2-Instruct) is
rendered in the model flag's place. `--filter-zero-reward-samples` is not a miles flag and is never
emitted. See docs/design.md §8 for where the recipes differ from the reference launchers.
"""

from __future__ import annotations

from collections.abc import Iterator

from kimi_core.recipe.plan import resolve_path
from kimi_core.recipe.sections import Recipe

Flag = tuple[str, ...]


def _fmt(value: float | int) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _fmt_whole(value: float) -> str:
    """A whole number without its `.0` (miles writes `--beta-fast 32`, `--beta-slow 1`)."""
    return str(int(value)) if value.is_integer() else repr(value)


def _path(recipe: Recipe, value: str, run_name: str) -> str:
    if recipe.cluster.base_dir is None:
        recipe = recipe.model_copy(update={"cluster": recipe.cluster.model_copy(update={"base_dir": "$BASE_DIR"})})
    return resolve_path(recipe, value, run_name=run_name)


def _moe_layer_freq(layers: int, dense: int) -> str:
    """Megatron's `--moe-layer-freq` mask as miles renders it (`moe_layer_freq` of
    miles/utils/external_utils/model_args_utils.py @31f1ca961): the first `dense` layers 0, the rest 1."""
    dense = min(dense, layers)
    return "[" + ",".join(["0"] * dense + ["1"] * (layers - dense)) + "]"


def model_args(r: Recipe) -> Iterator[Flag]:
    a = r.model.architecture
    yield ("--disable-bias-linear",)
    yield ("--num-layers", str(a.num_hidden_layers))
    yield ("--hidden-size", str(a.hidden_size))
    yield ("--ffn-hidden-size", str(a.intermediate_size))
    yield ("--num-attention-heads", str(a.num_attention_heads))
    yield ("--kv-channels", str(a.qk_rope_head_dim))
    yield ("--normalization", "RMSNorm")
    yield ("--position-embedding-type", "rope")
    if a.rope_scaling is not None:
        yield ("--rope-type", a.rope_scaling.type)
    yield ("--norm-epsilon", _fmt(a.rms_norm_eps))
    yield ("--swiglu",)
    yield ("--untie-embeddings-and-output-weights",)
    yield ("--vocab-size", str(a.vocab_size))
    yield ("--multi-latent-attention",)
    if a.q_lora_rank is not None:
        yield ("--q-lora-rank", str(a.q_lora_rank))
    yield ("--kv-lora-rank", str(a.kv_lora_rank))
    yield ("--qk-head-dim", str(a.qk_nope_head_dim))
    yield ("--qk-pos-emb-head-dim", str(a.qk_rope_head_dim))
    yield ("--v-head-dim", str(a.v_head_dim))
    yield ("--qk-layernorm",)
    if a.rope_scaling is not None:
        yield ("--rotary-scaling-factor", _fmt(a.rope_scaling.factor))
    yield ("--rotary-base", _fmt(int(a.rope_theta)) if a.rope_theta.is_integer() else _fmt(a.rope_theta))
    if a.rope_scaling is not None:
        yield ("--original-max-position-embeddings", str(a.rope_scaling.original_max_position_embeddings))
        yield ("--beta-fast", _fmt_whole(a.rope_scaling.beta_fast))
        yield ("--beta-slow", _fmt_whole(a.rope_scaling.beta_slow))
        yield ("--mscale", _fmt(a.rope_scaling.mscale))
        yield ("--mscale-all-dim", _fmt(a.rope_scaling.mscale_all_dim))
    yield ("--no-rope-fusion",)
    yield ("--num-experts", str(a.n_routed_experts))
    yield ("--moe-layer-freq", _moe_layer_freq(a.num_hidden_layers, a.first_k_dense_replace))
    yield ("--moe-ffn-hidden-size", str(a.moe_intermediate_size))
    yield ("--moe-router-topk", str(a.num_experts_per_tok))
    yield ("--moe-shared-expert-intermediate-size", str(a.moe_intermediate_size * a.n_shared_experts))
    yield ("--moe-router-pre-softmax",)
    yield ("--moe-router-score-function", "sigmoid")
    yield ("--moe-router-enable-expert-bias",)
    yield ("--moe-router-load-balancing-type", "seq_aux_loss")
    yield ("--moe-token-dispatcher-type", r.parallel.moe_token_dispatcher_type or "alltoall")
    yield ("--moe-aux-loss-coeff", "0")
    yield ("--moe-router-bias-update-rate", "0")
    yield ("--moe-router-group-topk", str(a.topk_group))
    yield ("--moe-router-num-groups", str(a.n_group))
    yield ("--moe-grouped-gemm",)
    yield ("--moe-router-topk-scaling-factor", _fmt(a.routed_scaling_factor))
    yield ("--moe-router-dtype", "fp32")
    yield ("--moe-permute-fusion",)


def cluster_args(r: Recipe) -> Iterator[Flag]:
    yield ("--actor-num-nodes", str(r.cluster.num_nodes))
    yield ("--actor-num-gpus-per-node", str(r.cluster.gpus_per_node))
    yield ("--num-gpus-per-node", str(r.cluster.gpus_per_node))
    if r.parallel.colocate:
        yield ("--colocate",)
    yield ("--update-weight-buffer-size", str(r.sglang.update_weight_buffer_size))
    if r.sglang.use_miles_router:
        yield ("--use-miles-router",)


def ckpt_args(r: Recipe, run_name: str) -> Iterator[Flag]:
    ck = r.checkpoint
    yield ("--hf-checkpoint", _path(r, ck.hf_checkpoint, run_name))
    if ck.ref_load:
        yield ("--ref-load", _path(r, ck.ref_load, run_name))
    load = ck.load or ck.save
    if load:
        yield ("--load", _path(r, load, run_name))
    if ck.save:
        yield ("--save", _path(r, ck.save, run_name))
    if ck.save_interval:
        yield ("--save-interval", str(ck.save_interval))
    if ck.megatron_to_hf_mode:
        yield ("--megatron-to-hf-mode", ck.megatron_to_hf_mode)
    if r.model.pass_name_to_miles:
        yield ("--model-name", r.model.name)


def rollout_args(r: Recipe, run_name: str) -> Iterator[Flag]:
    d, ro = r.data, r.rollout
    yield ("--prompt-data", _path(r, d.prompt_data, run_name))
    yield ("--input-key", d.input_key)
    yield ("--label-key", d.label_key)
    if d.metadata_key:
        yield ("--metadata-key", d.metadata_key)
    if d.apply_chat_template:
        yield ("--apply-chat-template",)
    if d.rollout_shuffle:
        yield ("--rollout-shuffle",)
    if d.balance_data:
        yield ("--balance-data",)
    yield ("--rm-type", ro.rm_type)
    yield ("--num-rollout", str(ro.num_rollout))
    yield ("--rollout-batch-size", str(ro.rollout_batch_size))
    yield ("--n-samples-per-prompt", str(ro.n_samples_per_prompt))
    yield ("--rollout-max-response-len", str(ro.max_response_len))
    yield ("--rollout-temperature", _fmt(ro.temperature))
    if ro.top_p != 1.0:
        yield ("--rollout-top-p", _fmt(ro.top_p))
    if ro.global_batch_size is not None:
        yield ("--global-batch-size", str(ro.global_batch_size))
    if ro.use_dynamic_global_batch_size:
        yield ("--use-dynamic-global-batch-size",)
    if ro.over_sampling_batch_size is not None:
        yield ("--over-sampling-batch-size", str(ro.over_sampling_batch_size))
    if ro.dynamic_sampling_filter == "nonzero_std":
        yield (
            "--dynamic-sampling-filter-path",
            "miles.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std",
        )
    if ro.num_steps_per_rollout is not None:
        yield ("--num-steps-per-rollout", str(ro.num_steps_per_rollout))
    yield ("--seed", str(ro.seed))


def eval_args(r: Recipe, run_name: str) -> Iterator[Flag]:
    ev = r.eval
    if not ev.datasets:
        return
    if ev.interval is not None:
        yield ("--eval-interval", str(ev.interval))
    pairs = [part for d in ev.datasets for part in (d.name, _path(r, d.path, run_name))]
    yield ("--eval-prompt-data", *pairs)
    yield ("--n-samples-per-eval-prompt", str(ev.n_samples_per_prompt))
    if ev.max_response_len is not None:
        yield ("--eval-max-response-len", str(ev.max_response_len))
    if ev.temperature is not None:
        yield ("--eval-temperature", _fmt(ev.temperature))
    yield ("--eval-top-p", _fmt(ev.top_p))


def perf_args(r: Recipe) -> Iterator[Flag]:
    p = r.parallel
    yield ("--tensor-model-parallel-size", str(p.tensor))
    if p.sequence_parallel:
        yield ("--sequence-parallel",)
    yield ("--pipeline-model-parallel-size", str(p.pipeline))
    yield ("--context-parallel-size", str(p.context))
    yield ("--expert-model-parallel-size", str(p.expert))
    yield ("--expert-tensor-parallel-size", str(p.expert_tensor))
    if p.decoder_last_pipeline_num_layers is not None:
        yield ("--decoder-last-pipeline-num-layers", str(p.decoder_last_pipeline_num_layers))
    if p.recompute_granularity:
        yield ("--recompute-granularity", p.recompute_granularity)
    if p.recompute_method:
        yield ("--recompute-method", p.recompute_method)
    if p.recompute_num_layers is not None:
        yield ("--recompute-num-layers", str(p.recompute_num_layers))
    if p.use_dynamic_batch_size:
        yield ("--use-dynamic-batch-size",)
    if p.max_tokens_per_gpu is not None:
        yield ("--max-tokens-per-gpu", str(p.max_tokens_per_gpu))


def grpo_args(r: Recipe) -> Iterator[Flag]:
    g = r.grpo
    yield ("--advantage-estimator", g.advantage_estimator)
    if g.use_kl_loss:
        yield ("--use-kl-loss",)
    yield ("--kl-loss-coef", f"{g.kl_loss_coef:.2f}")
    yield ("--kl-loss-type", g.kl_loss_type)
    yield ("--entropy-coef", f"{g.entropy_coef:.2f}")
    yield ("--eps-clip", _fmt(g.eps_clip))
    yield ("--eps-clip-high", _fmt(g.eps_clip_high))
    if g.eps_clip_c is not None:
        yield ("--eps-clip-c", _fmt(g.eps_clip_c))
    if g.use_tis:
        yield ("--use-tis",)
    if g.calculate_per_token_loss:
        yield ("--calculate-per-token-loss",)


def optimizer_args(r: Recipe) -> Iterator[Flag]:
    o = r.optimizer
    yield ("--optimizer", o.optimizer)
    yield ("--lr", f"{o.lr:g}")
    yield ("--lr-decay-style", o.lr_decay_style)
    yield ("--weight-decay", _fmt(o.weight_decay))
    yield ("--adam-beta1", _fmt(o.adam_beta1))
    yield ("--adam-beta2", _fmt(o.adam_beta2))
    if o.cpu_offload:
        yield ("--optimizer-cpu-offload",)
    if o.overlap_cpu_optimizer_d2h_h2d:
        yield ("--overlap-cpu-optimizer-d2h-h2d",)
    if o.use_precision_aware_optimizer:
        yield ("--use-precision-aware-optimizer",)
    if o.use_distributed_optimizer:
        yield ("--use-distributed-optimizer",)


def sglang_args(r: Recipe) -> Iterator[Flag]:
    s = r.sglang
    yield ("--rollout-num-gpus-per-engine", str(s.gpus_per_engine))
    yield ("--sglang-mem-fraction-static", _fmt(s.mem_fraction_static))
    if s.enable_dp_attention:
        yield ("--sglang-enable-dp-attention",)
    if s.dp_size is not None:
        yield ("--sglang-dp-size", str(s.dp_size))
    if s.moe_dense_tp_size is not None:
        yield ("--sglang-moe-dense-tp-size", str(s.moe_dense_tp_size))
    if s.enable_dp_lm_head:
        yield ("--sglang-enable-dp-lm-head",)
    yield ("--sglang-ep-size", str(s.ep_size))
    yield ("--sglang-server-concurrency", str(s.server_concurrency))
    if s.cuda_graph_bs:
        yield ("--sglang-cuda-graph-bs", *(str(b) for b in s.cuda_graph_bs))
    if s.use_rollout_routing_replay:
        yield ("--use-rollout-routing-replay",)


def misc_args(r: Recipe) -> Iterator[Flag]:
    p = r.parallel
    yield ("--attention-dropout", _fmt(p.attention_dropout))
    yield ("--hidden-dropout", _fmt(p.hidden_dropout))
    if p.accumulate_allreduce_grads_in_fp32:
        yield ("--accumulate-allreduce-grads-in-fp32",)
    if p.attention_softmax_in_fp32:
        yield ("--attention-softmax-in-fp32",)
    if p.attention_backend:
        yield ("--attention-backend", p.attention_backend)
    if not p.check_for_nan_in_loss_and_grad:
        yield ("--no-check-for-nan-in-loss-and-grad",)
    if p.moe_enable_deepep:
        yield ("--moe-enable-deepep",)


def miles_arg_groups(recipe: Recipe, *, run_name: str | None = None) -> dict[str, list[Flag]]:
    """The flags, grouped like the reference launcher's arrays."""
    name = run_name or recipe.name
    return {
        "CLUSTER_ARGS": list(cluster_args(recipe)),
        "MODEL_ARGS": list(model_args(recipe)),
        "CKPT_ARGS": list(ckpt_args(recipe, name)),
        "ROLLOUT_ARGS": list(rollout_args(recipe, name)),
        "EVAL_ARGS": list(eval_args(recipe, name)),
        "PERF_ARGS": list(perf_args(recipe)),
        "GRPO_ARGS": list(grpo_args(recipe)),
        "OPTIMIZER_ARGS": list(optimizer_args(recipe)),
        "SGLANG_ARGS": list(sglang_args(recipe)),
        "MISC_ARGS": list(misc_args(recipe)),
    }


def render_miles_args(recipe: Recipe, *, run_name: str | None = None) -> str:
    """The flag list as text: `# GROUP` headers, then one flag (with its values) per line."""
    lines: list[str] = []
    for group, flags in miles_arg_groups(recipe, run_name=run_name).items():
        if not flags:
            continue
        lines.append(f"# {group}")
        lines += [" ".join(flag) for flag in flags]
    return "\n".join(lines) + "\n"


def render_miles_env(recipe: Recipe) -> dict[str, str]:
    """The runtime env of the reference launcher (NVLS is decided on the node, see slurm templates)."""
    return dict(recipe.env)
