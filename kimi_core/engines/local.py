"""LocalEngine: the GRPO recipe on one machine (CPU, or one GPU) with a tiny Kimi-shaped model.

Per rollout (docs/design.md §3): draw prompts -> sample n responses each -> reward -> dynamic-sampling
filter -> group advantages -> recompute logp_old (per minibatch; the first minibatch's in its own
loss forward) -> `num_steps_per_rollout` Adam steps -> save if asked. Saves hold the policy as HF
safetensors, the optimizer state, the data position, every RNG state and the metrics of the
rollouts since the previous save, so a resumed run is bitwise identical on CPU to one that never
stopped. A rollout that raises restores the state it started from, so retrying it is bitwise
identical too.

Fault points (`kimi_core.faults`, hook via `$KIMI_GRPO_FAULT_HOOK`): `train.mid` after sampling,
before the optimizer steps; `save.mid` after the model files of a checkpoint, before its optimizer
file. Both get `rollout_id` and `paths` (the run's `RunPaths`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kimi_core import grpo
from kimi_core.atomic import write_bytes_atomic
from kimi_core.checkpoint.int4 import fake_quantize_int4
from kimi_core.data import read_prepared
from kimi_core.engines.base import ROLLOUT_METRICS_FILE, EngineInputs, EvalResult, RolloutResult
from kimi_core.engines.prompts import PromptSampler
from kimi_core.engines.rollout import SamplingSpec, collect_groups, sample_groups
from kimi_core.engines.update import LossSpec, build_batch, train_steps
from kimi_core.faults import fault_point
from kimi_core.model.deepseek import KimiForCausalLM
from kimi_core.model.io import load_model, save_pretrained
from kimi_core.recipe import Recipe, plan_run
from kimi_core.rewards import grader_restarts, grader_timeouts, score_batch
from kimi_core.run_state import (
    RunPaths,
    begin_checkpoint,
    checkpoint_dir,
    commit_checkpoint,
    dataset_state_path,
)
from kimi_core.tokenizer import KimiByteTokenizer


def eval_generator(rollout_seed: int, rollout_id: int) -> torch.Generator:
    """The sampling RNG of the eval after `rollout_id`: a stream of its own, seeded by the rollout id,
    so evaluating never moves the training RNG and the same eval always draws the same samples."""
    return torch.Generator().manual_seed(rollout_seed * 7919 + rollout_id + 1)


class QATView(nn.Module):
    """The policy seen through fake INT4 quantization of its routed-expert weights (straight-through).

    Only `mlp.experts.*` linear weights are quantized, per row in groups of `group_size`, as the
    K2.5 recipe's INT4 QAT does; the stored parameters stay full precision.
    """

    def __init__(self, inner: KimiForCausalLM, *, group_size: int):
        super().__init__()
        self.inner = inner
        self.group_size = group_size
        self.names = [n for n, _ in inner.named_parameters() if ".mlp.experts." in n and n.endswith(".weight")]

        self._cached: tuple[tuple[int, ...], dict[str, torch.Tensor]] | None = None

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def lm_head(self) -> nn.Linear:
        return self.inner.lm_head

    def new_cache(self, **kwargs: Any) -> Any:
        return self.inner.new_cache(**kwargs)

    @contextlib.contextmanager
    def frozen_weights(self) -> Iterator[QATView]:
        """No fused fast path: sampling must see the quantized expert weights."""
        yield self

    def _quantized(self) -> dict[str, torch.Tensor]:
        params = dict(self.inner.named_parameters())
        if torch.is_grad_enabled():
            return {n: fake_quantize_int4(params[n], group_size=self.group_size) for n in self.names}
        versions = tuple(params[n]._version for n in self.names)  # unchanged weights: reuse (sampling)
        if self._cached is None or self._cached[0] != versions:
            self._cached = (versions, {n: fake_quantize_int4(params[n], group_size=self.group_size) for n in self.names})
        return self._cached[1]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        logits: torch.Tensor = torch.func.functional_call(self.inner, self._quantized(), args, kwargs, strict=False)
        return logits


@dataclass(frozen=True)
class _Snapshot:
    """Everything a rollout may move, copied before it starts (cheap: the model is tiny)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    data: dict[str, int]
    generator: torch.Tensor
    torch_rng: torch.Tensor
    unsaved: dict[int, dict[str, float]]


class LocalEngine:
    """Implements `kimi_core.engines.base.Engine` with our torch model, sampler and GRPO math."""

    def __init__(self, recipe: Recipe, *, paths: RunPaths, inputs: EngineInputs, device: str = "cpu"):
        self.recipe = recipe
        self.paths = paths
        self.inputs = inputs
        self.device = device
        self.plan = plan_run(recipe)
        self.tokenizer = KimiByteTokenizer()
        self.policy: KimiForCausalLM | QATView | None = None
        self._unsaved: dict[int, dict[str, float]] = {}  # metrics of the rollouts since the last save

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, resume_from: int | None) -> int:
        """Load the initial weights or the checkpoint of `resume_from` (weights, optimizer, data
        position, RNG states); return the first rollout id to run."""
        r = self.recipe
        source = self.inputs.initial_checkpoint if resume_from is None else str(self._ckpt(resume_from) / "model")
        self.model = load_model(source, dtype=torch.float32).to(self.device)
        self.policy = QATView(self.model, group_size=r.checkpoint.int4_group_size) if r.grpo.int4_fake_qat else self.model
        self.reference = None
        if r.grpo.use_kl_loss and r.grpo.kl_loss_coef > 0:
            self.reference = load_model(self.inputs.initial_checkpoint, dtype=torch.float32).to(self.device).eval()
        o = r.optimizer
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
            weight_decay=o.weight_decay,
        )
        self.sampler = PromptSampler(read_prepared(self.inputs.train_data), seed=r.rollout.seed, shuffle=r.data.rollout_shuffle)
        self.generator = torch.Generator().manual_seed(r.rollout.seed)
        torch.manual_seed(r.rollout.seed)
        self._unsaved = {}
        if resume_from is None:
            return 0
        self.optimizer.load_state_dict(torch.load(self._ckpt(resume_from) / "optimizer.pt", weights_only=True))
        state = torch.load(dataset_state_path(self.paths, resume_from), weights_only=False)
        self.sampler.load_state_dict(state["data"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return resume_from + 1

    def close(self) -> None:
        self.policy = self.model = self.reference = None  # type: ignore[assignment]

    # ---- one rollout -----------------------------------------------------------------------
    def train_rollout(self, rollout_id: int, *, save: bool, force_sync: bool) -> RolloutResult:
        """Train rollout `rollout_id`; with `save`, commit its checkpoint before returning.

        `force_sync` is accepted for the protocol: this engine always saves synchronously. When the
        call raises (a fault in sampling, training or the save), the engine is put back as it was
        before the call, so retrying the same rollout id trains exactly what an uninterrupted run
        would; an unfinished save leaves no temp directory behind (unless the process died).
        """
        if self.policy is None:
            raise RuntimeError("the engine is not started (call start first)")
        before = self._snapshot()
        try:
            metrics = self._train(rollout_id)
            unsaved = {**self._unsaved, rollout_id: dict(metrics)}
            checkpoint = self._save(rollout_id, unsaved) if save else None
        except BaseException:
            self._restore(before)
            raise
        self._unsaved = {} if save else unsaved
        return RolloutResult(rollout_id=rollout_id, metrics=metrics, checkpoint=checkpoint)

    def _train(self, rollout_id: int) -> dict[str, float]:
        """Sample, reward, filter, compute advantages and take the optimizer steps; return metrics."""
        policy, r, started = self._started_policy(), self.recipe, time.perf_counter()
        spec = SamplingSpec(r.rollout.n_samples_per_prompt, r.rollout.max_response_len, r.rollout.temperature, r.rollout.top_p)
        groups, stats = collect_groups(
            self.sampler.draw,
            lambda rows: sample_groups(policy, self.tokenizer, rows, spec=spec, reward_fn=self._score,
                                       generator=self.generator, apply_chat_template=r.data.apply_chat_template),
            batch_size=r.rollout.rollout_batch_size,
            over_sampling_batch_size=r.rollout.over_sampling_batch_size,
            filter_zero_std=r.rollout.dynamic_sampling_filter == "nonzero_std",
        )
        rollout_time = time.perf_counter() - started
        samples = [(g.prompt_ids + resp, len(g.prompt_ids), lp) for g in groups for resp, lp in zip(g.responses, g.rollout_logprobs)]
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
        batch = build_batch(
            policy, self.reference, sequences=[s[0] for s in samples], prompt_lens=[s[1] for s in samples],
            rewards=rewards, n_samples_per_prompt=r.rollout.n_samples_per_prompt, rollout_logprobs=[s[2] for s in samples],
            num_steps=self.plan.steps_per_rollout,
        )
        fault_point("train.mid", rollout_id=rollout_id, paths=self.paths)
        train_metrics = train_steps(
            policy, self.optimizer, batch, spec=self._loss_spec(), clip_grad=r.optimizer.clip_grad,
        )
        train_time = time.perf_counter() - started - rollout_time
        lengths = [len(resp) for g in groups for resp in g.responses]
        truncated = [t for g in groups for t in g.truncated]
        return {
            "rollout/raw_reward": rewards.mean().item(),
            "rollout/response_len/mean": sum(lengths) / len(lengths),
            "rollout/response_len/max": float(max(lengths)),
            "rollout/truncated_ratio": sum(truncated) / len(truncated),
            "rollout/advantages/abs_mean": batch.advantages.abs().mean().item(),
            "rollout/dynamic_filter/prompts_drawn": float(stats.prompts_drawn),
            **{f"rollout/dynamic_filter/drop_zero_std_{v:g}": float(c) for v, c in stats.dropped_by_reward.items()},
            **train_metrics,
            "perf/rollout_time": rollout_time,
            "perf/train_time": train_time,
            "perf/tokens_per_s": stats.generated_tokens / max(rollout_time, 1e-9),
            # running totals of this process: a crashed grader worker is visible, never silent zeros
            "rollout/grader_restarts": float(grader_restarts()),
            "rollout/grader_timeouts": float(grader_timeouts()),
        }

    def _started_policy(self) -> KimiForCausalLM | QATView:
        if self.policy is None:
            raise RuntimeError("the engine is not started (call start first)")
        return self.policy

    def _score(self, responses: list[str], labels: list[str]) -> list[float]:
        return [float(x) for x in score_batch(responses, labels, rm_type=self.recipe.rollout.rm_type)]

    def _loss_spec(self) -> LossSpec:
        g = self.recipe.grpo
        return LossSpec(
            eps_clip=g.eps_clip, eps_clip_high=g.eps_clip_high, eps_clip_c=g.eps_clip_c, use_tis=g.use_tis,
            tis_clip=g.tis_clip, kl_loss_coef=g.kl_loss_coef, use_kl_loss=g.use_kl_loss, entropy_coef=g.entropy_coef,
            per_token_loss=g.calculate_per_token_loss,
        )

    # ---- retry safety ----------------------------------------------------------------------
    def _snapshot(self) -> _Snapshot:
        """Copies of the weights, optimizer, data position, RNG states and unsaved metrics."""
        return _Snapshot(
            model={name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()},
            optimizer=copy.deepcopy(self.optimizer.state_dict()),
            data=self.sampler.state_dict(),
            generator=self.generator.get_state(),
            torch_rng=torch.get_rng_state(),
            unsaved=dict(self._unsaved),
        )

    def _restore(self, snapshot: _Snapshot) -> None:
        """Put the engine back to `snapshot` (used once: the optimizer then owns its tensors)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.load_state_dict(snapshot.model)
        self.optimizer.load_state_dict(snapshot.optimizer)
        self.sampler.load_state_dict(snapshot.data)
        self.generator.set_state(snapshot.generator)
        torch.set_rng_state(snapshot.torch_rng)
        self._unsaved = snapshot.unsaved

    # ---- eval ------------------------------------------------------------------------------
    def evaluate(self, rollout_id: int) -> EvalResult:
        """avg@n, unbiased pass@k and length stats per eval set, and the first groups' generations;
        its own RNG seeded by the rollout id (`eval_generator`), so training is not perturbed."""
        policy, r, ev, started = self._started_policy(), self.recipe, self.recipe.eval, time.perf_counter()
        generator = eval_generator(r.rollout.seed, rollout_id)
        n = ev.n_samples_per_prompt
        spec = SamplingSpec(n, ev.max_response_len or r.rollout.max_response_len,
                            r.rollout.temperature if ev.temperature is None else ev.temperature, ev.top_p)
        metrics: dict[str, float] = {}
        samples: list[dict[str, Any]] = []
        for name, path in self.inputs.eval_data.items():
            groups = sample_groups(policy, self.tokenizer, read_prepared(path), spec=spec, reward_fn=self._score,
                                   generator=generator, apply_chat_template=r.data.apply_chat_template)
            rewards = torch.tensor([g.rewards for g in groups])
            lengths = [len(x) for g in groups for x in g.responses]
            metrics[f"eval/{name}"] = rewards.mean().item()
            for k in sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n}):
                correct = (rewards > 0.5).sum(dim=1).tolist()
                metrics[f"eval/{name}/pass_at_{k}"] = sum(grpo.pass_at_k(n, c, k) for c in correct) / len(correct)
            metrics[f"eval/{name}/response_len/mean"] = sum(lengths) / len(lengths)
            metrics[f"eval/{name}/truncated_ratio"] = sum(t for g in groups for t in g.truncated) / len(lengths)
            samples += [
                {"rollout_id": rollout_id, "dataset": name, "label": str(g.row["label"]), "response": g.texts[0],
                 "reward": g.rewards[0]}
                for g in groups[: r.tracking.sample_generations_per_eval]
            ]
        metrics["perf/eval_time"] = time.perf_counter() - started
        return EvalResult(rollout_id=rollout_id, metrics=metrics, samples=tuple(samples))

    # ---- checkpoints -----------------------------------------------------------------------
    def _ckpt(self, rollout_id: int) -> Path:
        return Path(checkpoint_dir(self.paths, rollout_id))

    def _save(self, rollout_id: int, unsaved: dict[int, dict[str, float]]) -> str:
        """Write and commit the checkpoint of `rollout_id`; return its directory.

        Order: data position + RNG states (atomic file), then the iter dir in a temp dir (model,
        optimizer, `ROLLOUT_METRICS_FILE` holding `unsaved`), renamed into place, and the tracker
        file last. A save that raises removes its temp dir.
        """
        state = {"data": self.sampler.state_dict(), "generator": self.generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "rollout_id": rollout_id}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        target = dataset_state_path(self.paths, rollout_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target, buffer.getvalue())
        tmp = Path(begin_checkpoint(self.paths, rollout_id))
        try:
            save_pretrained(self.model, self.model.config, tmp / "model")
            fault_point("save.mid", rollout_id=rollout_id, paths=self.paths)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            metrics = json.dumps({str(k): v for k, v in sorted(unsaved.items())})
            (tmp / ROLLOUT_METRICS_FILE).write_text(metrics, encoding="utf-8")
            return str(commit_checkpoint(self.paths, rollout_id, tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
