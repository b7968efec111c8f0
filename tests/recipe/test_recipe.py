"""Recipe loading: every shipped recipe and profile validates; every rule rejects with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kimi_core.recipe import RecipeError, load_profile, load_recipe, plan_run, recipe_hash
from kimi_core.recipe.sections import SECTIONS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
PROFILES = sorted((CONFIGS / "clusters").glob("*.yaml"))
K25 = CONFIGS / "kimi-k25-grpo.yaml"
LOCAL = CONFIGS / "local.yaml"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    plan = plan_run(recipe)
    assert plan.world_size >= 1
    assert sum(plan.layers_per_stage) == recipe.model.architecture.num_hidden_layers


#: Profiles made for another recipe than the 32 x 8 K2.5 one: (recipe, its number of nodes).
PROFILE_RECIPES = {"h200-4gpu.yaml": (K25.parent / "kimi-k25-2layer-smoke.yaml", 1),
                   # the two-node test cluster: the local recipe (its Ray ports are laid out for few nodes)
                   "localhost-slurm.yaml": (K25.parent / "local.yaml", 1)}


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_every_profile_validates_with_its_recipe(profile: Path) -> None:
    load_profile(str(profile))
    recipe_path, nodes = PROFILE_RECIPES.get(profile.name, (K25, 32))
    recipe = load_recipe(recipe_path, cluster=str(profile))
    assert recipe.cluster.num_nodes == nodes


def test_k25_plan_matches_the_reference_layout() -> None:
    plan = plan_run(load_recipe(K25))
    assert plan.world_size == 256
    assert plan.data_parallel == 1
    assert plan.layers_per_stage == (8,) * 7 + (5,)
    assert plan.num_sglang_engines == 32
    assert plan.steps_per_rollout == 1
    assert plan.global_batch_size == 256
    assert plan.eval_before_train is True
    assert plan.eval_after == (19,)
    assert plan.save_after == (19,)


def test_k2_thinking_derives_global_batch_from_steps() -> None:
    plan = plan_run(load_recipe(CONFIGS / "kimi-k2-thinking.yaml"), dataset_rows=17290)
    assert (plan.global_batch_size, plan.steps_per_rollout) == (256, 4)
    assert plan.num_sglang_engines == 16
    assert plan.rollouts_per_epoch == 17290 // 128
    assert plan.eval_after == (19, 39, 59, 79, 99)


def test_h200_profile_fills_site_values() -> None:
    recipe = load_recipe(K25, cluster="h200")
    assert recipe.cluster.executor == "slurm"
    assert recipe.cluster.partition == "h200"


def test_base_dir_from_environment_wins_over_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIMI_GRPO_BASE_DIR", "/data/site")
    assert load_recipe(K25, cluster="h200").cluster.base_dir == "/data/site"


def test_profile_conflicting_with_recipe_is_an_error(tmp_path: Path) -> None:
    profile = tmp_path / "odd.yaml"
    profile.write_text("gpus_per_node: 4\nexecutor: slurm\npartition: p\n")
    with pytest.raises(RecipeError, match=r"cluster.gpus_per_node: the recipe says 8"):
        load_recipe(K25, cluster=str(profile))


def test_unknown_profile_key_lists_valid_keys(tmp_path: Path) -> None:
    profile = tmp_path / "bad.yaml"
    profile.write_text("partitoin: p\n")
    with pytest.raises(RecipeError, match=r"partitoin.*valid keys:.*partition"):
        load_profile(str(profile))


def test_recipe_hash_ignores_base_dir_and_num_rollout() -> None:
    a = load_recipe(K25)
    b = load_recipe(K25, base_dir="/elsewhere", overrides=["rollout.num_rollout=40"])
    c = load_recipe(K25, overrides=["optimizer.lr=2.0e-6"])
    assert recipe_hash(a) == recipe_hash(b)
    assert recipe_hash(a) != recipe_hash(c)


def _leaf_paths(data: dict, prefix: str = "") -> list[str]:
    paths = [prefix] if prefix else []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            paths += _leaf_paths(value, path)
    return paths


SECTION_PATHS = [p for p in _leaf_paths(yaml.safe_load(K25.read_text())) if p != "env"]  # env: free mapping


@pytest.mark.parametrize("section_path", SECTION_PATHS)
def test_unknown_key_anywhere_is_rejected_with_valid_keys(section_path: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(K25, overrides=[f"{section_path}.no_such_key=1"])
    message = str(err.value)
    assert f"{section_path}.no_such_key: unknown key" in message
    assert "valid keys:" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    data = yaml.safe_load(K25.read_text())
    data["rollouts"] = {}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=r"rollouts: unknown key.*valid keys:.*rollout"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("override", "key_path"),
    [
        ('parallel.tensor="8"', "parallel.tensor"),
        ('rollout.rollout_batch_size="32"', "rollout.rollout_batch_size"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("grpo.use_tis=3", "grpo.use_tis"),
        ("model.architecture.rms_norm_eps=tiny", "model.architecture.rms_norm_eps"),
        ("sglang.cuda_graph_bs=[1, two]", "sglang.cuda_graph_bs[1]"),
        ("rollout.rm_type=f1", "rollout.rm_type"),
    ],
)
def test_wrong_type_names_the_full_key_path(override: str, key_path: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(K25, overrides=[override])
    assert str(err.value).splitlines()[1].strip().startswith(f"- {key_path}:")


RULE_CASES = [
    # (overrides, fragment the message must contain)
    (["parallel.tensor=7"], "parallel.tensor x parallel.pipeline x parallel.context"),
    (["parallel.expert=30"], "parallel.expert x parallel.expert_tensor x parallel.pipeline"),
    (["parallel.expert=256"], "n_routed_experts = 384 must be divisible by parallel.expert = 256"),
    (["parallel.decoder_last_pipeline_num_layers=6"], "parallel.decoder_last_pipeline_num_layers = 6"),
    (["parallel.decoder_last_pipeline_num_layers=null", "parallel.pipeline=4", "parallel.expert=16"],
     "num_hidden_layers = 61 is not divisible by parallel.pipeline = 4"),
    (["rollout.global_batch_size=96"], "rollout.global_batch_size = 96 must divide"),
    (["rollout.num_steps_per_rollout=2"], "rollout.global_batch_size x rollout.num_steps_per_rollout = 256 x 2"),
    (["rollout.over_sampling_batch_size=16"], "rollout.over_sampling_batch_size = 16 must be >= rollout.rollout_batch_size"),
    (["rollout.dynamic_sampling_filter=nonzero_std"], "rollout.dynamic_sampling_filter needs rollout.over_sampling_batch_size"),
    (["sglang.gpus_per_engine=3", "sglang.ep_size=3"], "sglang.gpus_per_engine = 3 must divide the rollout GPUs"),
    (["sglang.ep_size=16"], "sglang.ep_size = 16 must be <= sglang.gpus_per_engine = 8"),
    (["eval.interval=0"], "eval.interval"),
    (["checkpoint.save_interval=-1"], "checkpoint.save_interval"),
    (["checkpoint.save=null"], "checkpoint.save_interval = 20 requires checkpoint.save"),
    (["data.prompt_data=$BASE_DIR/dapo.jsonl"], "data.prompt_data = '$BASE_DIR/dapo.jsonl' uses templating"),
    (["checkpoint.ref_load=ftp://host/x"], "unsupported URL scheme 'ftp'"),
    (["checkpoint.hf_checkpoint=' x'"], "checkpoint.hf_checkpoint = ' x' is empty or has surrounding whitespace"),
    (["cluster.executor=slurm"], "cluster.partition is required"),
    (["eval.datasets=[]"], "eval.interval is set but eval.datasets is empty"),
    (["grpo.kl_loss_coef=0.1"], "grpo.kl_loss_coef > 0 needs grpo.use_kl_loss"),
    (["tracking.tracking_uri=sqlite:////shared/mlflow.db"], "tracking.tracking_uri = 'sqlite:////shared/mlflow.db'"),
]


@pytest.mark.parametrize(("overrides", "fragment"), RULE_CASES, ids=[c[1][:40] for c in RULE_CASES])
def test_each_cross_field_rule_names_its_fields(overrides: list[str], fragment: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(K25, overrides=overrides)
    assert fragment in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(RecipeError, match="YAML mapping"):
        load_recipe(scalar)


def test_recipe_is_frozen() -> None:
    recipe = load_recipe(K25)
    with pytest.raises(ValidationError):
        recipe.rollout.num_rollout = 3  # type: ignore[misc]


def test_sections_cover_the_named_sections() -> None:
    expected = {"model", "checkpoint", "data", "rollout", "grpo", "optimizer", "parallel", "sglang",
                "eval", "tracking", "cluster"}
    assert set(SECTIONS) == expected


def test_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    """`1e-3` is a float (YAML 1.2), in files and in --set; a quoted one stays a string and is rejected."""
    recipe = load_recipe(LOCAL, overrides=["optimizer.lr=1e-3", "grpo.eps_clip=2E-1"])
    assert recipe.optimizer.lr == 1e-3 and recipe.grpo.eps_clip == 0.2
    text = (LOCAL).read_text().replace("lr: 3.0e-4", "lr: 3e-4")
    assert "lr: 3e-4" in text
    (tmp_path / "r.yaml").write_text(text)
    assert load_recipe(tmp_path / "r.yaml").optimizer.lr == 3e-4
    with pytest.raises(RecipeError, match="optimizer.lr"):
        load_recipe(LOCAL, overrides=['optimizer.lr="1e-3"'])


# The K2.5 recipe shrunk to one or two 8-GPU nodes (TP 8, no PP/CP).
_SMALL_LAYOUT = ["parallel.pipeline=1", "parallel.context=1", "parallel.decoder_last_pipeline_num_layers=null"]


def test_multi_node_gpu_needs_an_mlflow_server() -> None:
    two_nodes = ["cluster.num_nodes=2", *_SMALL_LAYOUT, "parallel.expert=16"]
    with pytest.raises(RecipeError) as err:
        load_recipe(K25, overrides=[*two_nodes, "tracking.tracking_uri=sqlite:////shared/runs/mlflow.db"])
    message = str(err.value)
    assert "tracking.tracking_uri" in message and "--set tracking.tracking_uri=" in message
    assert "cluster.num_nodes = 2" in message
    for uri in ("http://mlflow:5000", "https://mlflow.example.org"):
        assert load_recipe(K25, overrides=[*two_nodes, f"tracking.tracking_uri={uri}"]).tracking.tracking_uri == uri
    # Unset: the run takes $MLFLOW_TRACKING_URI at run time; the 32-node recipes validate as they are.
    assert load_recipe(K25).tracking.tracking_uri is None


def test_one_node_and_cpu_recipes_may_track_to_a_file() -> None:
    one_node = load_recipe(K25, overrides=["cluster.num_nodes=1", *_SMALL_LAYOUT, "parallel.expert=8",
                                           "tracking.tracking_uri=sqlite:////tmp/mlflow.db"])
    assert one_node.tracking.tracking_uri == "sqlite:////tmp/mlflow.db"
    local = load_recipe(CONFIGS / "local.yaml", overrides=["tracking.tracking_uri=sqlite:////tmp/mlflow.db"])
    assert local.cluster.accelerator == "cpu"
