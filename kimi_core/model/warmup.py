"""The local recipe's base model: a tiny Kimi-shaped model after a short supervised warm-up.

The warm-up teaches the K2.5 output shape (`...</think>` then `\\boxed{N}`) on worked examples of
the synthetic task, so the base model solves a fraction of the problems and GRPO has signal. It is
deterministic for a seed and writes an HF checkpoint that `transformers` can load.

Loss: mean over response tokens of `(1 - eps) * (-log p(y_t)) + eps * mean_v(-log p(v))`, i.e.
cross-entropy against the label-smoothed target `(1 - eps) * onehot(y_t) + eps / V` with
`eps = spec.label_smoothing`. Its optimum puts mass `eps` on every token, so the base model is
accurate when greedy but noisy when sampled at T=1, as a real base model is: GRPO's sharpening of
the sampling distribution then has a measurable gain.

Optimiser: AdamW at `spec.lr` with a linear ramp over the first 5% of the steps, then cosine decay
to 0 (`lr_s = lr * 0.5 * (1 + cos(pi * (s - w) / (steps - w)))`); the annealed end makes a short
warm-up markedly more accurate than a constant rate.

Determinism: the same spec gives the same safetensors bytes. CPU matmul kernels split work by the
intra-op thread count and round differently for some shapes (e.g. an expert's token count), so the
warm-up runs on `spec.num_threads` threads whatever the caller set, and restores the caller's count.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from kimi_core.data import as_messages, worked_solution
from kimi_core.data.synthetic import rows_from_uri
from kimi_core.model.config import ModelConfig
from kimi_core.model.deepseek import KimiForCausalLM
from kimi_core.model.io import save_pretrained
from kimi_core.recipe.sections import Architecture, WarmupSection
from kimi_core.tokenizer import KimiByteTokenizer


def model_config(arch: Architecture, tokenizer: KimiByteTokenizer) -> ModelConfig:
    """The HF `deepseek_v3` config of a recipe's architecture section."""
    data = arch.model_dump()
    if data["vocab_size"] < len(tokenizer):
        raise ValueError(f"model.architecture.vocab_size = {data['vocab_size']} is smaller than the tokenizer's {len(tokenizer)} ids")
    data.update(model_type="deepseek_v3", num_key_value_heads=arch.num_attention_heads,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return ModelConfig.from_hf_dict(data)


def warmup_lr(step: int, *, steps: int, lr: float) -> float:
    """The learning rate of warm-up step `step` (0-based): linear ramp over 5% of `steps`, then cosine to 0."""
    ramp = max(1, steps // 20)
    if step < ramp:
        return lr * (step + 1) / ramp
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - ramp) / max(1, steps - ramp)))


def warmup_loss(model: KimiForCausalLM, sequences: list[list[int]], prompt_lens: list[int], *, label_smoothing: float) -> torch.Tensor:
    """Label-smoothed cross-entropy over the response tokens `seq[prompt_len:]` (see the module docstring).

    Sequences are right-padded to `[B, L]`; logits `[B, L, V]` at position `t` predict token `t + 1`;
    the loss averages over the response positions of all rows.
    """
    length = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    real = torch.zeros(len(sequences), length, dtype=torch.bool)
    response = torch.zeros(len(sequences), length - 1, dtype=torch.bool)
    for i, (seq, plen) in enumerate(zip(sequences, prompt_lens)):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        real[i, : len(seq)] = True
        response[i, plen - 1 : len(seq) - 1] = True
    logp = F.log_softmax(model(ids, attention_mask=real)[:, :-1].float(), dim=-1)  # [B, L-1, V]
    nll = -logp.gather(2, ids[:, 1:, None])[..., 0]
    per_token = (1.0 - label_smoothing) * nll + label_smoothing * -logp.mean(dim=-1)
    return per_token[response].mean()


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block with `torch.set_num_threads(count)`; the previous count is restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_base_model(arch: Architecture, out_dir: str | Path, *, spec: WarmupSection) -> dict[str, float]:
    """Initialise the tiny model from `spec.seed`, warm it up on `spec.num_threads` threads, save it
    under `out_dir`; return stats."""
    with intra_op_threads(spec.num_threads):
        return _build(arch, out_dir, spec=spec)


def _build(arch: Architecture, out_dir: str | Path, *, spec: WarmupSection) -> dict[str, float]:
    started = time.perf_counter()
    tokenizer = KimiByteTokenizer()
    torch.manual_seed(spec.seed)
    model = KimiForCausalLM(model_config(arch, tokenizer))
    rows = rows_from_uri(spec.source)
    prompts = [tokenizer.apply_chat_template(as_messages(r["prompt"]), tokenize=True, add_generation_prompt=True) for r in rows]
    answers = [tokenizer.encode(worked_solution(r)) + [tokenizer.eos_token_id] for r in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(spec.seed)
    loss = torch.tensor(0.0)
    for step in range(spec.steps):
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(step, steps=spec.steps, lr=spec.lr)
        idx = torch.randint(len(rows), (spec.batch_size,), generator=gen).tolist()
        loss = warmup_loss(model, [prompts[i] + answers[i] for i in idx], [len(prompts[i]) for i in idx],
                           label_smoothing=spec.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    save_pretrained(model, model.config, out_dir)
    return {"warmup/final_loss": loss.item(), "warmup/seconds": time.perf_counter() - started, "warmup/steps": spec.steps}
