"""`kimi-grpo validate` and `render`: output, exit codes, and the hand-written miles flag goldens."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "miles-args"


def test_validate_k25_shows_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ROOT / "configs/kimi-k25-grpo.yaml")]) == 0
    out = capsys.readouterr().out
    for needle in ["world size", "256", "7 x 8 layers + 5", "SGLang engines", "32",
                   "before rollout 0; after rollouts 19", "after rollouts 19"]:
        assert needle in out, needle


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["grpo.eps_clipp=0.1"], "grpo.eps_clipp"),
        (['parallel.tensor="8"'], "parallel.tensor"),
        (["parallel.tensor=7"], "parallel.tensor"),
        (["parallel.expert=30"], "parallel.expert"),
        (["model.architecture.bogus=1"], "model.architecture.bogus"),
    ],
)
def test_invalid_recipe_exits_2_naming_the_key(overrides: list[str], key: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["validate", str(ROOT / "configs/kimi-k25-grpo.yaml")]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert key in captured.err
    assert "Traceback" not in captured.err


def test_console_entry_point_exit_code_and_no_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "validate", "configs/kimi-k25-grpo.yaml", "--set", "parallel.expert=30"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert "parallel.expert" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["kimi-k25-grpo", "kimi-k2-thinking", "kimi-k2-instruct"])
def test_render_miles_args_matches_golden(name: str, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KIMI_GRPO_BASE_DIR", raising=False)
    assert main(["render", str(ROOT / f"configs/{name}.yaml"), "--what", "miles-args"]) == 0
    rendered = capsys.readouterr().out
    golden = (GOLDEN / f"{name}.txt").read_text()
    diff = "\n".join(difflib.unified_diff(golden.splitlines(), rendered.splitlines(), "golden", "rendered", lineterm=""))
    assert rendered == golden, (
        f"rendered miles args differ from tests/golden/miles-args/{name}.txt:\n{diff}\n"
        "The goldens are written by hand from the reference recipe; if the change is intended, edit the golden file."
    )


def test_rendered_flags_never_include_the_nonexistent_filter_flag(capsys: pytest.CaptureFixture[str]) -> None:
    main(["render", str(ROOT / "configs/kimi-k25-grpo.yaml"), "--what", "miles-args"])
    assert "--filter-zero-reward-samples" not in capsys.readouterr().out


def _golden_flags(name: str) -> dict[str, str]:
    """Flag name -> its values (space-joined) of one golden file; asserts no flag is rendered twice."""
    flags: dict[str, str] = {}
    for line in (GOLDEN / f"{name}.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        flag, _, values = line.partition(" ")
        assert flag not in flags, f"{flag} rendered twice in {name}.txt"
        flags[flag] = values
    return flags


@pytest.mark.parametrize(("name", "beta_fast", "factor"),
                         [("kimi-k25-grpo", "32", "64.0"), ("kimi-k2-thinking", "1", "64.0"),
                          ("kimi-k2-instruct", "1", "32.0")])
def test_goldens_carry_the_yarn_rope_flags(name: str, beta_fast: str, factor: str) -> None:
    # miles scripts/models/kimi-k2-thinking.py @31f1ca961 (K2.5 via scripts/models/kimi-k25.py with
    # beta_fast=32) and scripts/models/kimi-k2.py: YaRN with a 4096-token original context.
    flags = _golden_flags(name)
    assert {k: flags[k] for k in ["--position-embedding-type", "--rope-type", "--rotary-scaling-factor",
                                  "--rotary-base", "--original-max-position-embeddings", "--beta-fast",
                                  "--beta-slow", "--mscale", "--mscale-all-dim"]} == {
        "--position-embedding-type": "rope", "--rope-type": "yarn", "--rotary-scaling-factor": factor,
        "--rotary-base": "50000", "--original-max-position-embeddings": "4096", "--beta-fast": beta_fast,
        "--beta-slow": "1", "--mscale": "1.0", "--mscale-all-dim": "1.0",
    }


def test_moe_layer_freq_is_rendered_as_miles_writes_it() -> None:
    # miles/utils/external_utils/model_args_utils.py @31f1ca961 (moe_layer_freq): an explicit 0/1 list.
    assert _golden_flags("kimi-k25-grpo")["--moe-layer-freq"] == "[" + ",".join(["0"] + ["1"] * 60) + "]"


# Flags every Kimi model script of miles passes (@31f1ca961: scripts/models/kimi-k2-thinking.py, which
# scripts/models/kimi-k25.py reuses with beta_fast=32, and scripts/models/kimi-k2.py; identical flag
# names, different values). --attention-softmax-in-fp32 is also in these scripts; it is listed with
# the launchers' misc flags below and rendered once.
_MILES_MODEL_FLAGS = {
    "--disable-bias-linear", "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
    "--kv-channels", "--normalization", "--position-embedding-type", "--rope-type", "--norm-epsilon", "--swiglu",
    "--untie-embeddings-and-output-weights", "--vocab-size", "--multi-latent-attention", "--q-lora-rank",
    "--kv-lora-rank", "--qk-head-dim", "--qk-pos-emb-head-dim", "--v-head-dim", "--qk-layernorm",
    "--rotary-scaling-factor", "--rotary-base", "--original-max-position-embeddings", "--beta-fast",
    "--beta-slow", "--mscale", "--mscale-all-dim", "--no-rope-fusion",
    "--num-experts", "--moe-layer-freq", "--moe-ffn-hidden-size", "--moe-router-topk",
    "--moe-shared-expert-intermediate-size", "--moe-router-pre-softmax", "--moe-router-score-function",
    "--moe-router-enable-expert-bias", "--moe-router-load-balancing-type", "--moe-token-dispatcher-type",
    "--moe-aux-loss-coeff", "--moe-router-bias-update-rate", "--moe-router-group-topk", "--moe-router-num-groups",
    "--moe-grouped-gemm", "--moe-router-topk-scaling-factor", "--moe-router-dtype", "--moe-permute-fusion",
}

# Flags both launchers pass (miles scripts/run_kimi_k25.py `_execute_train` and scripts/run_kimi_k2.py
# `execute` @31f1ca961), eval included (K2.5: --enable-eval); wandb flags and --extra-args left out.
_MILES_LAUNCHER_COMMON = {
    "--hf-checkpoint", "--ref-load", "--load", "--save", "--save-interval",
    "--prompt-data", "--input-key", "--label-key", "--apply-chat-template", "--rollout-shuffle", "--balance-data",
    "--rm-type", "--num-rollout", "--rollout-batch-size", "--n-samples-per-prompt", "--rollout-max-response-len",
    "--rollout-temperature",
    "--eval-interval", "--eval-prompt-data", "--n-samples-per-eval-prompt", "--eval-max-response-len", "--eval-top-p",
    "--tensor-model-parallel-size", "--sequence-parallel", "--pipeline-model-parallel-size",
    "--context-parallel-size", "--expert-model-parallel-size", "--expert-tensor-parallel-size",
    "--decoder-last-pipeline-num-layers", "--recompute-granularity", "--recompute-method", "--recompute-num-layers",
    "--use-dynamic-batch-size", "--max-tokens-per-gpu",
    "--advantage-estimator", "--kl-loss-coef", "--kl-loss-type", "--entropy-coef", "--eps-clip", "--eps-clip-high",
    "--optimizer", "--lr", "--lr-decay-style", "--weight-decay", "--adam-beta1", "--adam-beta2",
    "--optimizer-cpu-offload", "--overlap-cpu-optimizer-d2h-h2d", "--use-precision-aware-optimizer",
    "--rollout-num-gpus-per-engine", "--sglang-mem-fraction-static", "--sglang-ep-size", "--sglang-server-concurrency",
    "--attention-dropout", "--hidden-dropout", "--accumulate-allreduce-grads-in-fp32", "--attention-softmax-in-fp32",
    "--attention-backend", "--colocate", "--update-weight-buffer-size", "--actor-num-nodes",
    "--actor-num-gpus-per-node", "--num-gpus-per-node",
}

# miles scripts/run_kimi_k25.py @31f1ca961, on top of the common flags.
_MILES_K25_ONLY = {
    "--megatron-to-hf-mode", "--model-name", "--global-batch-size", "--use-dynamic-global-batch-size",
    "--use-distributed-optimizer", "--sglang-cuda-graph-bs", "--use-rollout-routing-replay",
    "--no-check-for-nan-in-loss-and-grad",
}

# miles scripts/run_kimi_k2.py @31f1ca961 (both variants), on top of the common flags.
_MILES_K2_ONLY = {
    "--over-sampling-batch-size", "--dynamic-sampling-filter-path", "--num-steps-per-rollout", "--use-kl-loss",
    "--sglang-enable-dp-attention", "--sglang-dp-size", "--sglang-moe-dense-tp-size", "--sglang-enable-dp-lm-head",
}

_MILES_FLAGS = {
    "kimi-k25-grpo": _MILES_MODEL_FLAGS | _MILES_LAUNCHER_COMMON | _MILES_K25_ONLY,
    # scripts/run_kimi_k2.py: Kimi-K2-Thinking has use_tis=True.
    "kimi-k2-thinking": _MILES_MODEL_FLAGS | _MILES_LAUNCHER_COMMON | _MILES_K2_ONLY | {"--use-tis"},
    # scripts/run_kimi_k2.py: Kimi-K2-Instruct has megatron_deepep=True (--moe-enable-deepep, and
    # --moe-token-dispatcher-type flex, rendered in the model flag's place).
    "kimi-k2-instruct": _MILES_MODEL_FLAGS | _MILES_LAUNCHER_COMMON | _MILES_K2_ONLY | {"--moe-enable-deepep"},
}

# Flags the recipes add that miles' launchers do not pass. Both exist in miles/utils/arguments.py
# @31f1ca961: --seed (miles' default is 1234; the recipes pin 42) and --use-miles-router (quoted by the
# K2.5 recipe page, not passed by scripts/run_kimi_k25.py). See docs/design.md §8.
_RECIPE_ONLY = {
    "kimi-k25-grpo": {"--seed", "--use-miles-router"},
    "kimi-k2-thinking": {"--seed"},
    "kimi-k2-instruct": {"--seed"},
}


@pytest.mark.parametrize("name", ["kimi-k25-grpo", "kimi-k2-thinking", "kimi-k2-instruct"])
def test_golden_flags_are_the_miles_launcher_flags(name: str) -> None:
    rendered = set(_golden_flags(name))
    assert _MILES_FLAGS[name] - rendered == set(), "flags miles passes that the golden lacks"
    assert rendered - _MILES_FLAGS[name] == _RECIPE_ONLY[name], "flags the golden adds beyond miles"
