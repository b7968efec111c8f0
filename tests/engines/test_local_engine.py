"""LocalEngine on the local recipe made small: determinism, bitwise resume, crash-safe saves,
eval metrics and RNG isolation, the fake INT4 QAT path, and the warm-up that builds the base model."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

from kimi_core.checkpoint.int4 import fake_quantize_int4
from kimi_core.data import read_prepared
from kimi_core.engines.base import ROLLOUT_METRICS_FILE
from kimi_core.engines.local import QATView, eval_generator
from kimi_core.engines.rollout import SamplingSpec, sample_groups
from kimi_core.faults import FAULT_HOOK_ENV, fault_hook
from kimi_core.model.io import load_model, load_state_dict
from kimi_core.model.warmup import build_base_model, warmup_loss
from kimi_core.rewards import score_batch
from kimi_core.run_state import checkpoint_dir, cleanup_incomplete, dataset_state_path, latest_checkpoint
from tests.engines.conftest import EVAL_SET, REPO, SMALL, small_recipe
from tests.faults import AT_SAVE_ENV, InjectedFault, chain, raise_once


def weights(engine) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in engine.model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"tensors differ: {different[:5]}"


def without_timings(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


def train(engine, rollout_id: int, *, save: bool = False) -> dict[str, float]:
    """Train one rollout (saving it when asked); return its metrics."""
    result = engine.train_rollout(rollout_id, save=save, force_sync=False)
    assert result.rollout_id == rollout_id
    assert (result.checkpoint is not None) == save
    return result.metrics


def optimizer_tensors(engine) -> list[torch.Tensor]:
    state = engine.optimizer.state_dict()["state"]
    return [value for key in sorted(state) for _, value in sorted(state[key].items())]


# ----------------------------------------------------------------------------- determinism
def test_same_checkpoint_and_seed_give_identical_rollouts(new_engine, prepared):
    base = load_state_dict(prepared.base_dir)
    runs = []
    for name in ("first", "second"):
        engine = new_engine(name)
        assert engine.start(None) == 0
        metrics = [without_timings(train(engine, rollout_id)) for rollout_id in range(2)]
        runs.append((metrics, weights(engine)))
    (metrics_a, weights_a), (metrics_b, weights_b) = runs
    assert metrics_a == metrics_b
    assert_same_weights(weights_a, weights_b)
    # the rollouts trained: rewards varied within some group and the weights moved
    assert max(m["rollout/advantages/abs_mean"] for m in metrics_a) > 0
    assert any(not torch.equal(weights_a[k], base[k]) for k in base)


# ----------------------------------------------------------------------------- resume
def test_resume_from_a_checkpoint_is_bitwise_identical(new_engine):
    straight = new_engine("straight")
    straight.start(None)
    straight_metrics = [without_timings(train(straight, rollout_id, save=rollout_id == 3)) for rollout_id in range(4)]

    interrupted = new_engine("resumed")
    interrupted.start(None)
    for rollout_id in range(2):
        train(interrupted, rollout_id, save=rollout_id == 1)
    saved = weights(interrupted)
    interrupted.close()

    resumed = new_engine("resumed")
    assert latest_checkpoint(resumed.paths) == 1
    assert resumed.start(1) == 2
    assert_same_weights(weights(resumed), saved)
    resumed_metrics = [without_timings(train(resumed, rollout_id, save=rollout_id == 3)) for rollout_id in (2, 3)]

    # same prompts (data position), same samples (RNG), same Adam moments -> same everything
    assert resumed_metrics == straight_metrics[2:]
    assert_same_weights(weights(resumed), weights(straight))
    for a, b in zip(optimizer_tensors(resumed), optimizer_tensors(straight), strict=True):
        assert torch.equal(a, b)
    files = [checkpoint_dir(e.paths, 3) / "model" / "model.safetensors" for e in (straight, resumed)]
    assert files[0].read_bytes() == files[1].read_bytes()
    assert any(not torch.equal(saved[k], v) for k, v in weights(straight).items())


_KILLED_SAVE = """
import json, sys, torch
from kimi_core.engines.local import EngineInputs, LocalEngine
from kimi_core.recipe import load_recipe
from kimi_core.run_state import RunPaths, latest_checkpoint
args = json.loads(sys.argv[1])
torch.set_num_threads(1)
engine = LocalEngine(load_recipe(args["recipe"], overrides=args["overrides"]),
                     paths=RunPaths.of(args["base_dir"], args["run_name"]), inputs=EngineInputs(**args["inputs"]))
start = engine.start(latest_checkpoint(engine.paths))
engine.train_rollout(start, save=True, force_sync=False)
"""


def test_a_half_written_checkpoint_is_never_the_latest(new_engine, prepared):
    engine = new_engine("crash")
    engine.start(None)
    for rollout_id in range(2):
        train(engine, rollout_id, save=rollout_id == 1)
    committed = weights(engine)
    engine.close()
    paths = engine.paths

    # another process trains rollout 2 and is SIGKILLed halfway through saving it
    args = {"recipe": str(REPO / "configs" / "local.yaml"), "overrides": SMALL, "base_dir": str(paths.base_dir),
            "run_name": paths.run_name, "inputs": vars(prepared.inputs)}
    env = {**os.environ, FAULT_HOOK_ENV: "tests.faults:at_save", AT_SAVE_ENV: "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, json.dumps(args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (paths.run_dir / ".fault-at-save-2").is_file()  # the hook's once-per-run marker
    leftovers = [p for p in paths.checkpoints.iterdir() if p.name.startswith("iter_0000002")]
    assert len(leftovers) == 1 and leftovers[0].name != checkpoint_dir(paths, 2).name
    assert (leftovers[0] / "model").is_dir() and not (leftovers[0] / "optimizer.pt").exists()
    assert dataset_state_path(paths, 2).is_file()  # written before the save commits, never read alone

    assert latest_checkpoint(paths) == 1
    restarted = new_engine("crash")
    assert restarted.start(latest_checkpoint(paths)) == 2
    assert_same_weights(weights(restarted), committed)
    assert cleanup_incomplete(paths) == leftovers
    train(restarted, 2, save=True)
    assert latest_checkpoint(paths) == 2


# ----------------------------------------------------------------------------- retries
def test_a_retried_rollout_equals_the_uninterrupted_one(new_engine):
    saves = {0, 2, 3}
    straight = new_engine("straight")
    straight.start(None)
    straight_metrics = [without_timings(train(straight, i, save=i in saves)) for i in range(4)]

    # transient faults inside a save (rollout 0: the first Adam state), after sampling (rollout 1),
    # and both in turn (rollout 2): each call raises once, and the retried call succeeds
    faults = [raise_once("save.mid", 0), raise_once("train.mid", 1), raise_once("train.mid", 2),
              raise_once("save.mid", 2)]
    retried = new_engine("retried")
    retried.start(None)
    retried_metrics = []
    with fault_hook(chain(*faults)):
        for rollout_id in range(4):
            for _attempt in range(3):
                before = (weights(retried), [t.clone() for t in optimizer_tensors(retried)], retried.sampler.state_dict(),
                          retried.generator.get_state(), torch.get_rng_state())
                try:
                    retried_metrics.append(without_timings(train(retried, rollout_id, save=rollout_id in saves)))
                    break
                except InjectedFault:
                    # the failed call left the engine exactly as it found it, and no unfinished save
                    assert_same_weights(weights(retried), before[0])
                    assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(retried), before[1], strict=True))
                    assert retried.sampler.state_dict() == before[2]
                    assert torch.equal(retried.generator.get_state(), before[3])
                    assert torch.equal(torch.get_rng_state(), before[4])
                    assert not [p for p in retried.paths.checkpoints.glob("iter_*") if ".tmp-" in p.name]
    assert [f.fired for f in faults] == [1, 1, 1, 1]

    assert retried_metrics == straight_metrics
    assert_same_weights(weights(retried), weights(straight))
    for a, b in zip(optimizer_tensors(retried), optimizer_tensors(straight), strict=True):
        assert torch.equal(a, b)
    assert latest_checkpoint(retried.paths) == 3
    for rollout_id in sorted(saves):
        files = [checkpoint_dir(e.paths, rollout_id) / "model" / "model.safetensors" for e in (straight, retried)]
        assert files[0].read_bytes() == files[1].read_bytes()
    # each checkpoint holds the metrics of the rollouts since the previous save, retries counted once
    for rollout_id, since_save in ((0, [0]), (2, [1, 2]), (3, [3])):
        saved = json.loads((checkpoint_dir(retried.paths, rollout_id) / ROLLOUT_METRICS_FILE).read_text())
        assert list(saved) == [str(i) for i in since_save]
        assert [without_timings(saved[str(i)]) for i in since_save] == [straight_metrics[i] for i in since_save]


# ----------------------------------------------------------------------------- eval
def test_evaluate_reports_avg_at_n_and_the_unbiased_pass_at_k(new_engine, prepared):
    engine = new_engine("eval")
    engine.start(None)
    result = engine.evaluate(0)
    metrics = result.metrics
    n = engine.recipe.eval.n_samples_per_prompt
    assert n == 4
    assert {f"eval/{EVAL_SET}", *(f"eval/{EVAL_SET}/pass_at_{k}" for k in (1, 2, 4))} <= metrics.keys()

    # the same eval drawn again from its documented RNG stream: per-prompt correct counts c_i
    recipe = engine.recipe
    temperature = recipe.rollout.temperature if recipe.eval.temperature is None else recipe.eval.temperature
    spec = SamplingSpec(n, recipe.eval.max_response_len or recipe.rollout.max_response_len, temperature, recipe.eval.top_p)
    groups = sample_groups(
        engine.policy, engine.tokenizer, read_prepared(prepared.inputs.eval_data[EVAL_SET]), spec=spec,
        reward_fn=lambda texts, labels: [float(x) for x in score_batch(texts, labels, rm_type=recipe.rollout.rm_type)],
        generator=eval_generator(recipe.rollout.seed, 0),
    )
    correct = [sum(r > 0.5 for r in g.rewards) for g in groups]
    assert any(0 < c < n for c in correct), f"need a prompt with mixed outcomes, got counts {correct}"
    assert metrics[f"eval/{EVAL_SET}"] == pytest.approx(sum(correct) / (n * len(correct)))
    for k in (1, 2, 4):
        # unbiased estimator: 1 - C(n - c, k) / C(n, k), averaged over prompts
        expected = sum(1 - math.comb(n - c, k) / math.comb(n, k) for c in correct) / len(correct)
        assert metrics[f"eval/{EVAL_SET}/pass_at_{k}"] == pytest.approx(expected)
    assert metrics[f"eval/{EVAL_SET}/pass_at_1"] == pytest.approx(metrics[f"eval/{EVAL_SET}"])
    again = engine.evaluate(0)  # the same rollout id draws the same samples (and metrics)
    assert again.samples == result.samples and without_timings(again.metrics) == without_timings(result.metrics)
    assert result.metrics["perf/eval_time"] > 0
    assert result.rollout_id == 0
    assert 0 < len(result.samples) <= recipe.tracking.sample_generations_per_eval
    assert all(sample["dataset"] == EVAL_SET and sample["rollout_id"] == 0 for sample in result.samples)


def test_evaluating_does_not_perturb_training(new_engine):
    evaluated, plain = new_engine("with-eval"), new_engine("without-eval")
    results = []
    for engine, with_eval in ((evaluated, True), (plain, False)):
        engine.start(None)
        metrics = [without_timings(train(engine, 0))]
        if with_eval:
            engine.evaluate(0)
        metrics.append(without_timings(train(engine, 1)))
        results.append(metrics)
    assert results[0] == results[1]
    assert_same_weights(weights(evaluated), weights(plain))


# ----------------------------------------------------------------------------- INT4 QAT
def test_fake_int4_qat_quantizes_routed_experts_with_a_straight_through_gradient(new_engine, prepared):
    engine = new_engine("qat", "grpo.int4_fake_qat=true")
    engine.start(None)
    group_size = engine.recipe.checkpoint.int4_group_size
    assert isinstance(engine.policy, QATView) and engine.policy.group_size == group_size
    assert engine.policy.names and all(".mlp.experts." in n for n in engine.policy.names)

    # reference: a plain copy of the policy whose routed-expert weights are fake-quantized in place
    quantized = load_model(prepared.base_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, param in quantized.named_parameters():
            if name in engine.policy.names:
                param.copy_(fake_quantize_int4(param, group_size=group_size))
    ids = torch.tensor([engine.tokenizer.encode("max(12,47)? Answer in \\boxed{}.47</think>\\boxed{47}")])
    logits_qat = engine.policy(ids)
    torch.testing.assert_close(logits_qat, quantized(ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits_qat, engine.model(ids), atol=1e-4)

    # straight-through: d loss / d w equals the gradient at the quantized weights
    logits_qat.log_softmax(-1)[0, :, 7].sum().backward()
    quantized(ids).log_softmax(-1)[0, :, 7].sum().backward()
    params = dict(engine.model.named_parameters())
    reference = dict(quantized.named_parameters())
    with_grad = [n for n in engine.policy.names if params[n].grad is not None and params[n].grad.abs().sum() > 0]
    assert with_grad, "no routed-expert weight received a gradient"
    for name in with_grad:
        torch.testing.assert_close(params[name].grad, reference[name].grad, rtol=1e-4, atol=1e-6)
    engine.optimizer.zero_grad(set_to_none=True)

    # a GRPO rollout trains the experts through the view; the stored weights stay full precision
    before = weights(engine)
    metrics = train(engine, 0)
    assert all(math.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(before[n], params[n]) for n in engine.policy.names)
    expert = params[engine.policy.names[0]].detach()
    assert not torch.equal(expert, fake_quantize_int4(expert, group_size=group_size))


# ----------------------------------------------------------------------------- warm-up
def test_warmup_is_deterministic_for_a_seed_whatever_the_callers_thread_count(tmp_path):
    # 3 steps of 4 rows are enough for an expert matmul whose rounding depends on the thread count
    recipe = small_recipe("model.warmup.steps=3", "model.warmup.batch_size=4", "model.warmup.label_smoothing=0.1")
    arch, spec = recipe.model.architecture, recipe.model.warmup
    built = {}
    for name, threads, seed in (("a", 1, 0), ("b", 1, 0), ("c", 2, 0), ("d", 1, 1)):
        torch.set_num_threads(threads)
        build_base_model(arch, tmp_path / name, spec=spec.model_copy(update={"seed": seed}))
        assert torch.get_num_threads() == threads  # the caller's setting is restored
        built[name] = (tmp_path / name / "model.safetensors").read_bytes()
    assert built["a"] == built["b"] == built["c"]
    assert built["a"] != built["d"]


class FixedLogits(nn.Module):
    """A 'model' whose logits [B, L, V] are given: the loss can be worked out by hand."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        assert ids.shape == self.logits.shape[:2]
        return self.logits


def test_label_smoothing_changes_the_warmup_loss_as_the_formula_says():
    # V = 3. Row 0 = [0, 0, 1] with a 1-token prompt: position 0 predicts token 0, position 1 token 1.
    # Row 1 = [2, 2] (right-padded to 3): position 0 predicts token 2; its position 1 is padding.
    ln2, ln3 = math.log(2.0), math.log(3.0)
    logits = torch.tensor([
        [[ln2, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, -5.0, 0.0]],  # p = (1/2, 1/4, 1/4); uniform; unused
        [[0.0, 0.0, ln2], [9.0, -9.0, 0.0], [5.0, -5.0, 0.0]],  # p = (1/4, 1/4, 1/2); padding; unused
    ])
    model = FixedLogits(logits)

    def loss(eps: float) -> float:
        return warmup_loss(model, [[0, 0, 1], [2, 2]], [1, 1], label_smoothing=eps).item()

    # Per response token: (1 - eps) * (-log p(y)) + eps * mean_v(-log p(v)).
    #   row 0 pos 0: -log p(0) = ln2, mean_v = (ln2 + ln4 + ln4) / 3 = 5/3 ln2 -> ln2 * (1 + 2 eps / 3)
    #   row 0 pos 1: uniform, both terms ln3                                  -> ln3
    #   row 1 pos 0: -log p(2) = ln2, mean_v = 5/3 ln2                        -> ln2 * (1 + 2 eps / 3)
    # loss = mean of the three = (2 ln2 (1 + 2 eps / 3) + ln3) / 3
    assert loss(0.0) == pytest.approx((2 * ln2 + ln3) / 3, rel=1e-6)      # = ln(12) / 3
    assert loss(0.3) == pytest.approx((2 * ln2 * 1.2 + ln3) / 3, rel=1e-6)
    assert loss(0.3) - loss(0.0) == pytest.approx(0.4 * ln2 / 3, rel=1e-5)
