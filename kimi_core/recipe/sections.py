"""The recipe: frozen, typed sections loaded from YAML (no templating).

Every section rejects unknown keys and wrong types (pydantic strict mode: the string "8" is not a
number). Paths are relative to `cluster.base_dir` unless absolute or a URL (`s3://`, `hf://`, ...).
Derived values (world size, DP size, schedules) live in `kimi_core.recipe.plan.RunPlan`, never here.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

T = TypeVar("T")


def _list_to_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


#: A YAML list stored as a tuple; the items keep strict types.
FrozenList = Annotated[tuple[T, ...], BeforeValidator(_list_to_tuple)]

#: Special `checkpoint.save` value: save under the run directory, `{base_dir}/runs/{run_name}/checkpoints`.
RUN_DIR = "run_dir"


class Section(BaseModel):
    """Base of every recipe section: frozen, strict, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class RopeScaling(Section):
    """YaRN RoPE scaling, HF `rope_scaling` of DeepSeek-V3 configs."""

    type: Literal["yarn"] = "yarn"
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


class Architecture(Section):
    """The DeepSeek-V3 / Kimi-K2 shape, with the HF `config.json` key names (`model_type: deepseek_v3`)."""

    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0, description="dense FFN width (first_k_dense_replace layers)")
    moe_intermediate_size: int = Field(gt=0, description="width of each routed / shared expert")
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    q_lora_rank: int | None = Field(default=None, gt=0)
    kv_lora_rank: int = Field(gt=0)
    qk_nope_head_dim: int = Field(gt=0)
    qk_rope_head_dim: int = Field(gt=0)
    v_head_dim: int = Field(gt=0)
    n_routed_experts: int = Field(gt=0)
    num_experts_per_tok: int = Field(gt=0)
    n_shared_experts: int = Field(ge=0)
    first_k_dense_replace: int = Field(ge=0)
    routed_scaling_factor: float = Field(gt=0)
    n_group: int = Field(default=1, gt=0)
    topk_group: int = Field(default=1, gt=0)
    norm_topk_prob: bool = True
    rms_norm_eps: float = Field(gt=0)
    rope_theta: float = Field(gt=0)
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = Field(gt=0)
    tie_word_embeddings: Literal[False] = False


class WarmupSection(Section):
    """Supervised warm-up that builds the local base model (`checkpoint.hf_checkpoint: build:tiny`)."""

    source: str = Field(description="synthetic:// source of worked examples (the training split)")
    steps: int = Field(default=300, gt=0)
    batch_size: int = Field(default=32, gt=0)
    lr: float = Field(default=3e-3, gt=0)
    seed: int = 0
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="eps of the label-smoothed loss: the base model's T=1 noise floor")
    num_threads: int = Field(
        default=1, gt=0,
        description="torch intra-op threads of the warm-up; CPU matmuls round differently per thread count, so it is part of the base model's identity",
    )


class ModelSection(Section):
    """Which model is trained and how its tokenizer is found."""

    name: str = Field(description="model name passed to the engine (miles `--model-name`)")
    pass_name_to_miles: bool = Field(
        default=True,
        description=(
            "render miles `--model-name`; False = leave it unset, so miles derives it from the HF config class "
            "(`deepseekv3config` for Kimi-K2), which is what its megatron-to-HF converter dispatches on"
        ),
    )
    architecture: Architecture
    tokenizer: str = Field(
        default="checkpoint",
        description="'checkpoint' = load from checkpoint.hf_checkpoint; 'kimi-byte' = the local byte tokenizer",
    )
    warmup: WarmupSection | None = None


class CheckpointSection(Section):
    """Where weights come from and where the run saves."""

    hf_checkpoint: str = Field(description="HF checkpoint of the actor (rollout weights); 'build:tiny' = build the local base model")
    actor_format: Literal["bf16", "fp8", "int4", "fp32"] = "bf16"
    ref_load: str | None = Field(default=None, description="initial / reference weights (Megatron torch_dist or HF)")
    load: str | None = Field(default=None, description="resume location; defaults to `save`")
    save: str | None = Field(default=None, description=f"checkpoint location; '{RUN_DIR}' = the run directory")
    save_interval: int | None = Field(default=None, gt=0)
    megatron_to_hf_mode: Literal["raw", "bridge"] | None = None
    int4_group_size: int = Field(default=32, gt=0)


class DataSection(Section):
    """Training prompts (miles `--prompt-data` rows: a prompt and a string label)."""

    prompt_data: str
    input_key: str = "prompt"
    label_key: str = "label"
    metadata_key: str | None = None
    apply_chat_template: bool = True
    rollout_shuffle: bool = True
    balance_data: bool = False
    on_error: Literal["strict", "skip"] = "strict"


class RolloutSection(Section):
    """Sampling and batch shape of one rollout."""

    num_rollout: int = Field(gt=0, description="absolute end rollout id; the loop is range(start, num_rollout)")
    rollout_batch_size: int = Field(gt=0, description="prompts per rollout")
    n_samples_per_prompt: int = Field(gt=0)
    max_response_len: int = Field(gt=0)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    global_batch_size: int | None = Field(default=None, gt=0, description="samples per optimizer step")
    num_steps_per_rollout: int | None = Field(default=None, gt=0)
    use_dynamic_global_batch_size: bool = False
    over_sampling_batch_size: int | None = Field(default=None, gt=0)
    dynamic_sampling_filter: Literal["nonzero_std"] | None = None
    rm_type: Literal["deepscaler", "math"]
    seed: int = 42


class GrpoSection(Section):
    """The GRPO objective (miles semantics, docs/design.md §7)."""

    advantage_estimator: Literal["grpo"] = "grpo"
    eps_clip: float = Field(default=0.2, gt=0)
    eps_clip_high: float = Field(default=0.28, gt=0)
    eps_clip_c: float | None = Field(default=None, gt=1, description="dual-clip constant (None = off)")
    use_kl_loss: bool = False
    kl_loss_coef: float = Field(default=0.0, ge=0)
    kl_loss_type: Literal["low_var_kl"] = "low_var_kl"
    entropy_coef: float = Field(default=0.0, ge=0)
    use_tis: bool = False
    tis_clip: float = Field(default=2.0, gt=0)
    calculate_per_token_loss: bool = False
    int4_fake_qat: bool = Field(default=False, description="fake-quantize routed experts to INT4 in training")


class OptimizerSection(Section):
    """Adam and its memory placement."""

    optimizer: Literal["adam"] = "adam"
    lr: float = Field(gt=0)
    lr_decay_style: Literal["constant"] = "constant"
    weight_decay: float = Field(default=0.0, ge=0)
    adam_beta1: float = Field(default=0.9, gt=0, lt=1)
    adam_beta2: float = Field(default=0.999, gt=0, lt=1)
    adam_eps: float = Field(default=1e-8, gt=0)
    clip_grad: float = Field(default=1.0, gt=0)
    cpu_offload: bool = False
    overlap_cpu_optimizer_d2h_h2d: bool = False
    use_precision_aware_optimizer: bool = False
    use_distributed_optimizer: bool = False


class ParallelSection(Section):
    """Megatron parallel layout and memory settings of the trainer."""

    tensor: int = Field(default=1, gt=0)
    pipeline: int = Field(default=1, gt=0)
    context: int = Field(default=1, gt=0)
    expert: int = Field(default=1, gt=0)
    expert_tensor: int = Field(default=1, gt=0)
    sequence_parallel: bool = False
    decoder_last_pipeline_num_layers: int | None = Field(default=None, gt=0)
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = Field(default=None, gt=0)
    use_dynamic_batch_size: bool = False
    max_tokens_per_gpu: int | None = Field(default=None, gt=0)
    attention_backend: Literal["flash", "fused", "unfused", "auto"] | None = None
    attention_dropout: float = Field(default=0.0, ge=0, lt=1)
    hidden_dropout: float = Field(default=0.0, ge=0, lt=1)
    accumulate_allreduce_grads_in_fp32: bool = False
    attention_softmax_in_fp32: bool = False
    moe_enable_deepep: bool = False
    moe_token_dispatcher_type: Literal["alltoall", "flex"] | None = None
    check_for_nan_in_loss_and_grad: bool = Field(
        default=True, description="Megatron's NaN check of loss and grads (False = `--no-check-for-nan-in-loss-and-grad`)",
    )
    colocate: bool = True


class SglangSection(Section):
    """The rollout engine (SGLang) layout."""

    gpus_per_engine: int = Field(default=1, gt=0)
    mem_fraction_static: float = Field(default=0.7, gt=0, le=1)
    ep_size: int = Field(default=1, gt=0)
    enable_dp_attention: bool = False
    dp_size: int | None = Field(default=None, gt=0)
    moe_dense_tp_size: int | None = Field(default=None, gt=0)
    enable_dp_lm_head: bool = False
    server_concurrency: int = Field(default=512, gt=0)
    cuda_graph_bs: FrozenList[int] | None = None
    use_rollout_routing_replay: bool = False
    use_miles_router: bool = False
    update_weight_buffer_size: int = Field(default=512 * 1024**2, gt=0, description="bytes")


class EvalDataset(Section):
    """One evaluation data set."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str


class EvalSection(Section):
    """Periodic evaluation (avg@n and pass@k)."""

    interval: int | None = Field(default=None, gt=0)
    datasets: FrozenList[EvalDataset] = ()
    n_samples_per_prompt: int = Field(default=1, gt=0)
    max_response_len: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    before_train: bool = True


class TrackingSection(Section):
    """MLflow tracking; `MLFLOW_TRACKING_URI` in the environment wins over `tracking_uri`."""

    experiment: str = "kimi-k25-grpo"
    tracking_uri: str | None = Field(default=None, description="None = sqlite file under base_dir")
    sample_generations_per_eval: int = Field(default=8, ge=0)


#: Worker ports of a loopback Ray head are drawn from [low, high) (`runtime.ray_local.worker_port_range`);
#: a Ray-on-Slurm layout stays out of it, so both can share a host (the local test cluster).
LOCAL_HEAD_WORKER_PORTS = (20000, 32000)
#: Linux's ephemeral range starts here: pinned ports stay below it so no outgoing socket takes one.
EPHEMERAL_PORT_START = 32768
#: Per-node daemon ports, `node_port_base + k`, in this order.
NODE_PORT_NAMES = ("node_manager", "object_manager", "metrics_export", "dashboard_agent_grpc",
                   "dashboard_agent_listen", "runtime_env_agent")


class RaySection(Section):
    """Ray on a Slurm allocation: pinned ports, readiness and lease (docs/design.md §6).

    Per-node ports are `node_port_base + k` (k: `NODE_PORT_NAMES`) and the worker range, each shifted
    by `node_index * node_port_stride`. The stride is 0 on a real cluster (every node is its own host)
    and > 0 when several Ray nodes share one host (the local two-node test cluster).
    """

    gcs_port: int = Field(default=6379, ge=1024, lt=EPHEMERAL_PORT_START)
    dashboard_port: int = Field(default=8265, ge=1024, lt=EPHEMERAL_PORT_START)
    client_port: int = Field(default=10001, ge=1024, lt=EPHEMERAL_PORT_START, description="Ray Client server (ray://)")
    node_port_base: int = Field(default=6800, ge=1024, lt=EPHEMERAL_PORT_START)
    min_worker_port: int = Field(default=10002, ge=1024, lt=EPHEMERAL_PORT_START)
    max_worker_port: int = Field(default=10999, ge=1024, lt=EPHEMERAL_PORT_START)
    node_port_stride: int = Field(default=0, ge=0)
    readiness_timeout_s: int = Field(default=900, gt=0, description="a RUNNING Ray job must be ready within this")
    lease_s: int = Field(default=300, gt=0, description="the Ray job ends itself when the flow stops touching its lease this long")

    def head_ports(self) -> dict[str, int]:
        return {"gcs": self.gcs_port, "dashboard": self.dashboard_port, "client": self.client_port}

    def node_ports(self, index: int) -> dict[str, int]:
        """The daemon ports and worker range of Ray node `index` (0 = the head)."""
        shift = index * self.node_port_stride
        ports = {name: self.node_port_base + k + shift for k, name in enumerate(NODE_PORT_NAMES)}
        return {**ports, "min_worker": self.min_worker_port + shift, "max_worker": self.max_worker_port + shift}

    def layout_problems(self, num_nodes: int) -> list[str]:
        """What is wrong with this layout for `num_nodes` nodes (empty when it is fine)."""
        problems: list[str] = []
        if self.min_worker_port > self.max_worker_port:
            return [f"cluster.ray.min_worker_port = {self.min_worker_port} > max_worker_port = {self.max_worker_port}"]
        owner: dict[int, str] = {port: f"{name} port" for name, port in self.head_ports().items()}
        # Stride 0: every node is its own host, so node 0 stands for all of them.
        for index in range(num_nodes if self.node_port_stride else 1):
            ports = self.node_ports(index)
            single = [(ports[name], f"node {index} {name} port") for name in NODE_PORT_NAMES]
            workers = range(ports["min_worker"], ports["max_worker"] + 1)
            for port, what in [*single, *((p, f"node {index} worker ports") for p in workers)]:
                if port >= EPHEMERAL_PORT_START:
                    problems.append(f"cluster.ray: {what} reach port {port}, in the ephemeral range (>= "
                                    f"{EPHEMERAL_PORT_START}): lower the bases or node_port_stride")
                    return problems
                if port in owner and owner[port] != what:
                    problems.append(f"cluster.ray: {what} and {owner[port]} share port {port}")
                    return problems
                owner[port] = what
        low, high = LOCAL_HEAD_WORKER_PORTS
        clash = sorted(port for port in owner if low <= port < high)
        if clash:
            problems.append(f"cluster.ray: port {clash[0]} is in {low}..{high - 1}, the worker ports of loopback "
                            "Ray heads on the same host: pin Ray-on-Slurm ports outside it")
        return problems


class ClusterSection(Section):
    """Where the job runs; site values usually come from a `configs/clusters/*.yaml` profile."""

    executor: Literal["local", "slurm"] = "local"
    accelerator: Literal["gpu", "cpu"] = "gpu"
    num_nodes: int = Field(default=1, gt=0)
    gpus_per_node: int = Field(default=8, ge=0)
    base_dir: str | None = Field(default=None, description="shared filesystem root; env KIMI_GRPO_BASE_DIR wins")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    container_image: str | None = None
    time_limit: str | None = Field(default=None, pattern=r"^\d+:[0-5]\d:[0-5]\d$", description="HH:MM:SS (hours may exceed 24)")
    cpus_per_task: int | None = Field(default=None, gt=0)
    signal_before_deadline_s: int = Field(default=600, gt=0)
    ray: RaySection = RaySection()


class Recipe(Section):
    """A whole training recipe. Load with `kimi_core.recipe.load_recipe`."""

    name: str
    model: ModelSection
    checkpoint: CheckpointSection
    data: DataSection
    rollout: RolloutSection
    grpo: GrpoSection = GrpoSection()
    optimizer: OptimizerSection
    parallel: ParallelSection = ParallelSection()
    sglang: SglangSection = SglangSection()
    eval: EvalSection = EvalSection()
    tracking: TrackingSection = TrackingSection()
    cluster: ClusterSection = ClusterSection()
    env: dict[str, str] = Field(default_factory=dict, description="environment of every job")

    @property
    def world_size(self) -> int:
        """Trainer processes: GPUs in the allocation, or one process per node on CPU."""
        if self.cluster.accelerator == "cpu":
            return self.cluster.num_nodes
        return self.cluster.num_nodes * self.cluster.gpus_per_node


SECTIONS: dict[str, type[Section]] = {
    name: field.annotation
    for name, field in Recipe.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, Section)
}
