"""`configs/kimi-k25-2layer-smoke.yaml` has the shape of miles' 2-layer K2.5 CI at the pin
(tests/e2e/megatron/model_scripts/test_kimi_k25_2layer_ci.py -> scripts/run_kimi_k25.py, 1 node x 4
GPUs, "debug_minimal"), and saves and evaluates after every rollout."""

from __future__ import annotations

from pathlib import Path

from kimi_core.miles_args import miles_arg_groups
from kimi_core.recipe import load_recipe, plan_run

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "kimi-k25-2layer-smoke.yaml"
#: The flags of run_kimi_k25.py @31f1ca961 for --num-nodes 1 --num-gpus-per-node 4 --num-rollout 2.
CI_FLAGS = {
    "--tensor-model-parallel-size": ("4",), "--sequence-parallel": (), "--pipeline-model-parallel-size": ("1",),
    "--context-parallel-size": ("1",), "--expert-model-parallel-size": ("4",), "--expert-tensor-parallel-size": ("1",),
    "--max-tokens-per-gpu": ("2048",), "--rollout-num-gpus-per-engine": ("4",), "--sglang-ep-size": ("4",),
    "--rollout-batch-size": ("32",), "--n-samples-per-prompt": ("8",), "--rollout-max-response-len": ("100",),
    "--global-batch-size": ("256",), "--num-rollout": ("2",), "--actor-num-nodes": ("1",),
    "--actor-num-gpus-per-node": ("4",), "--colocate": (), "--megatron-to-hf-mode": ("bridge",),
}


def test_the_smoke_recipe_has_the_shape_of_miles_2layer_ci() -> None:
    recipe = load_recipe(SMOKE, base_dir="/shared")
    flags = {flag[0]: tuple(str(v) for v in flag[1:]) for group in miles_arg_groups(recipe, run_name="smoke").values()
             for flag in group}
    assert {name: flags.get(name) for name in CI_FLAGS} == CI_FLAGS
    assert "--decoder-last-pipeline-num-layers" not in flags
    assert recipe.model.architecture.num_hidden_layers == 2 and recipe.model.architecture.first_k_dense_replace == 1
    plan = plan_run(recipe)
    assert (plan.world_size, plan.num_sglang_engines, plan.num_rollout) == (4, 1, 2)
    assert plan.save_after == (0, 1) and plan.eval_after == (0, 1)


def test_the_smoke_recipe_validates_with_its_4_gpu_profile() -> None:
    from flows.cli import main

    assert main(["validate", str(Path(__file__).resolve().parents[2] / "configs/kimi-k25-2layer-smoke.yaml"),
                 "--cluster", "h200-4gpu"]) == 0
