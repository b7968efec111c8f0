"""Batched sampling with the compressed KV cache, and differentiable response log-probs.

``generate`` left-pads the prompts, prefills each distinct prompt once in one forward (GRPO
samples every prompt n times: its cache rows are then repeated per sample), then decodes one
token per step for every unfinished row; rows that emit a stop token leave the batch (their cache rows are
dropped), and the loop ends when none is left or ``max_new_tokens`` is reached.

Sampling distribution: ``softmax(logits / temperature)`` restricted to the top-p nucleus
(smallest set of most likely tokens whose mass reaches ``top_p``), renormalized;
``temperature == 0`` is greedy (argmax). Reported log-probs are those of the sampled token
under ``log_softmax(logits / temperature)`` of the raw model, *without* the top-p truncation
(``temperature == 0`` reports ``log_softmax(logits)``), i.e. exactly what
``token_logprobs(..., temperature=temperature)`` recomputes.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kimi_core.model.attention import MLACache


class CausalLM(Protocol):
    """What ``generate`` and ``token_logprobs`` use of a model: ``KimiForCausalLM``, or a module
    standing in for one (the local engine's INT4 QAT view)."""

    @property
    def lm_head(self) -> nn.Linear: ...

    def frozen_weights(self) -> AbstractContextManager[object]: ...

    def new_cache(self, *, batch_size: int, max_len: int) -> MLACache: ...

    def __call__(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor: ...


@dataclass
class GenerationOutput:
    """Per prompt: response token ids (with the stop token when hit), their log-probs, and
    ``truncated`` = True when ``max_new_tokens`` ran out before a stop token."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    truncated: list[bool]


def _check_args(prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def left_pad(
    sequences: list[list[int]], *, pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B,L], mask [B,L])`` with each sequence right-aligned; mask 1 = real token."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for i, seq in enumerate(sequences):
        ids[i, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, length - len(seq) :] = True
    return ids.to(device), mask.to(device)


def sample_next(
    logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logits [B,V]``; returns ``(tokens [B], logprobs [B])``."""
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, F.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
    logp = F.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)
    probs = logp.exp()
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        tokens = order.gather(1, _draw_one(sorted_probs, generator)[:, None])[:, 0]
    else:
        tokens = _draw_one(probs, generator)
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def _draw_one(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``torch.multinomial(probs, 1, generator=generator)[:, 0]`` without its input checks.

    ATen draws one sample as ``argmax(probs / q)`` with ``q ~ Exp(1)`` from
    ``empty_like(probs).exponential_(generator)``; doing the same here gives the same tokens and
    consumes the generator identically (pinned by tests/model/test_sampling_pinned.py), minus
    multinomial's validation reductions and host syncs (min/max/sum + two ``.item()``) per step.
    ``probs`` come from a softmax here, so they are non-negative with positive row sums.
    """
    q = exponential_like(probs, generator)
    return torch.div(probs, q, out=q).argmax(dim=-1)


def exponential_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``torch.empty_like(x).exponential_(generator=generator)``: the same numbers from the same
    generator draws, about 3x faster on CPU.

    ATen's CPU kernel draws, one element at a time, ``u`` uniform in [0, 1) as a double from one
    64-bit draw, and returns ``-log1p(-u)`` cast to ``x``'s dtype (``DistributionsHelper.h``,
    ``TransformationHelper.h``). ``torch.rand(dtype=float64)`` draws the same ``u`` the same way;
    here the logarithm then runs as one vectorized kernel instead of per element. Equal to
    ``exponential_`` bit for bit for float32 in tests/model/test_sampling.py: the vectorized
    ``log1p`` may differ from the C library's in the last bit of the double, which the cast to
    float32 absorbs. Other dtypes and devices use ``exponential_``.
    """
    if x.dtype != torch.float32 or x.device.type != "cpu" or generator.device.type != "cpu":
        return torch.empty_like(x).exponential_(generator=generator)
    u = torch.rand(x.shape, dtype=torch.float64, generator=generator)
    return torch.log1p(u.neg_()).neg_().to(x.dtype)


@dataclass
class _Rows:
    """Outputs being filled in per prompt, and the prompt index of each live cache row."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    stopped: list[bool]
    live: list[int]

    @classmethod
    def empty(cls, n: int) -> _Rows:
        return cls([[] for _ in range(n)], [[] for _ in range(n)], [False] * n, list(range(n)))

    def record(self, next_ids: torch.Tensor, next_logp: torch.Tensor, *, stop: frozenset[int]) -> list[int]:
        """Append one sampled token per live row; return the positions of rows that go on."""
        keep = []
        for j, (row, tok, lp) in enumerate(zip(self.live, next_ids.tolist(), next_logp.tolist())):
            self.tokens[row].append(tok)
            self.logprobs[row].append(lp)
            if tok in stop:
                self.stopped[row] = True
            else:
                keep.append(j)
        self.live = [self.live[j] for j in keep]
        return keep


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (back to its previous state after).

    A decode step makes a few hundred short-lived tensor objects, so generation-0 collections ran
    every two steps or so; the sampler makes no reference cycles for them to find, and
    ``benchmarks/rollout_throughput.py`` measured them at 2-5% of a ``generate`` call."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@torch.inference_mode()
def generate(
    model: CausalLM,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_token_ids: Iterable[int],
    pad_token_id: int,
    generator: torch.Generator,
) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` response tokens for each prompt (see module docstring)."""
    _check_args(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    rows, stop = _Rows.empty(len(prompts)), frozenset(stop_token_ids)
    if max_new_tokens == 0:
        return GenerationOutput(rows.tokens, rows.logprobs, [True] * len(prompts))
    device = model.lm_head.weight.device
    distinct: dict[tuple[int, ...], int] = {}
    owner = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]  # row -> its distinct prompt
    ids, mask = left_pad([list(p) for p in distinct], pad_token_id=pad_token_id, device=device)
    with model.frozen_weights(), _collector_paused():
        cache = model.new_cache(batch_size=len(distinct), max_len=ids.shape[1] + max_new_tokens)
        logits = model(ids, attention_mask=mask, cache=cache, last_token_only=True)[:, -1]
        if len(distinct) < len(prompts):  # one cache row and one logits row per sample
            index = torch.tensor(owner, device=device)
            cache.keep_rows(index)
            logits = logits.index_select(0, index)
        for step in range(max_new_tokens):
            next_ids, next_logp = sample_next(logits, temperature=temperature, top_p=top_p, generator=generator)
            keep = rows.record(next_ids, next_logp, stop=stop)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(next_ids):  # finished rows leave the batch and the cache
                index = torch.tensor(keep, device=device)
                cache.keep_rows(index)
                next_ids = next_ids.index_select(0, index)
            logits = model(next_ids[:, None], cache=cache)[:, -1]
    return GenerationOutput(rows.tokens, rows.logprobs, [not s for s in rows.stopped])


def response_mask(
    sequences: list[list[int]], prompt_lens: list[int], *, device: torch.device | None = None
) -> torch.Tensor:
    """``[B, R]`` bool, True on the response tokens ``seq[prompt_len:]``, right-padded to the
    longest response ``R``: the layout of ``token_logprobs``' outputs."""
    resp_lens = torch.tensor([len(s) - p for s, p in zip(sequences, prompt_lens)], device=device)
    width = max(int(resp_lens.max()), 0)
    return torch.arange(width, device=device)[None, :] < resp_lens[:, None]


def token_logprobs(
    model: CausalLM,
    sequences: list[list[int]],
    prompt_lens: list[int],
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens ``seq[prompt_len:]`` under ``log_softmax(logits / T)``.

    Returns ``logp [B, R_max]`` (differentiable), ``mask [B, R_max]`` (1.0 = real response
    token, right padding 0) and, when asked, the entropy ``-sum p log p`` of the same
    distribution at each response position (else None). One full forward, right-padded.
    """
    if len(sequences) != len(prompt_lens) or not sequences:
        raise ValueError("sequences and prompt_lens must be non-empty and of equal length")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for i, (seq, plen) in enumerate(zip(sequences, prompt_lens)):
        if not 1 <= plen <= len(seq):
            raise ValueError(f"sequence {i}: prompt_len={plen} must be in [1, len(seq)={len(seq)}]")
    device = model.lm_head.weight.device
    length = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = True
    ids, mask = ids.to(device), mask.to(device)
    logits = model(ids, attention_mask=mask)
    resp_mask = response_mask(sequences, prompt_lens, device=device)
    offsets = torch.arange(resp_mask.shape[1], device=device)
    starts = torch.tensor(prompt_lens, device=device)[:, None] - 1
    pred_pos = (starts + offsets).clamp(max=length - 2 if length > 1 else 0)  # logits at t predict t+1
    target_pos = (pred_pos + 1).clamp(max=length - 1)
    step_logits = logits.gather(1, pred_pos[..., None].expand(-1, -1, logits.shape[-1])).float() / temperature
    step_logp = F.log_softmax(step_logits, dim=-1)
    targets = ids.gather(1, target_pos)
    logp = step_logp.gather(2, targets[..., None])[..., 0].masked_fill(~resp_mask, 0.0)
    entropy = None
    if with_entropy:
        entropy = -(step_logp.exp() * step_logp).sum(dim=-1).masked_fill(~resp_mask, 0.0)
    return logp, resp_mask.float(), entropy
