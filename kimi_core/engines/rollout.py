"""Rollout generation for the local engine: sample groups, score them, apply dynamic sampling."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kimi_core.data import as_messages
from kimi_core.grpo import nonzero_std_filter
from kimi_core.model.sampling import CausalLM, generate


@dataclass
class Group:
    """One prompt and its `n` sampled responses."""

    row: dict[str, Any]
    prompt_ids: list[int]
    responses: list[list[int]]
    rollout_logprobs: list[list[float]]
    truncated: list[bool]
    texts: list[str]
    rewards: list[float]


@dataclass
class SamplingSpec:
    """How to sample one batch of groups."""

    n_samples: int
    max_new_tokens: int
    temperature: float
    top_p: float


@dataclass
class RolloutStats:
    """What dynamic sampling did in one rollout."""

    prompts_drawn: int = 0
    groups_kept: int = 0
    dropped_by_reward: dict[float, int] = field(default_factory=dict)
    generated_tokens: int = 0


def prompt_ids(tokenizer: Any, row: dict[str, Any], *, apply_chat_template: bool) -> list[int]:
    """Token ids of a data row's prompt (a string is one user message when the template applies)."""
    prompt = row["prompt"]
    if apply_chat_template:
        return list(tokenizer.apply_chat_template(as_messages(prompt), tokenize=True, add_generation_prompt=True))
    if not isinstance(prompt, str):
        raise ValueError("data.apply_chat_template is false but a prompt is a message list")
    return list(tokenizer.encode(prompt))


def sample_groups(
    model: CausalLM,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    *,
    spec: SamplingSpec,
    reward_fn: Callable[[list[str], list[str]], list[float]],
    generator: torch.Generator,
    apply_chat_template: bool = True,
) -> list[Group]:
    """Generate `spec.n_samples` responses for every row in one batch and score them."""
    prompts = [prompt_ids(tokenizer, row, apply_chat_template=apply_chat_template) for row in rows]
    batch = [p for p in prompts for _ in range(spec.n_samples)]
    with torch.no_grad():
        out = generate(
            model, batch, max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
            stop_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, generator=generator,
        )
    texts = [tokenizer.decode([t for t in toks if t != tokenizer.eos_token_id]) for toks in out.tokens]
    labels = [str(row["label"]) for row in rows for _ in range(spec.n_samples)]
    rewards = [float(r) for r in reward_fn(texts, labels)]
    n = spec.n_samples
    return [
        Group(
            row=row, prompt_ids=prompts[g],
            responses=out.tokens[g * n:(g + 1) * n], rollout_logprobs=out.logprobs[g * n:(g + 1) * n],
            truncated=out.truncated[g * n:(g + 1) * n], texts=texts[g * n:(g + 1) * n],
            rewards=rewards[g * n:(g + 1) * n],
        )
        for g, row in enumerate(rows)
    ]


def collect_groups(
    draw: Callable[[int], list[dict[str, Any]]],
    sample: Callable[[list[dict[str, Any]]], list[Group]],
    *,
    batch_size: int,
    over_sampling_batch_size: int | None,
    filter_zero_std: bool,
    max_draw_rounds: int = 8,
) -> tuple[list[Group], RolloutStats]:
    """Draw prompts until `batch_size` groups pass the filter (DAPO dynamic sampling).

    Without the filter one draw of `batch_size` prompts is used as is. With it, prompts are drawn
    `over_sampling_batch_size` at a time and a group is kept only if its rewards have nonzero std;
    kept groups beyond `batch_size` are discarded. After `max_draw_rounds` draws the batch is
    topped up with dropped groups (their advantages are all zero) so a rollout always ends.
    """
    stats = RolloutStats()
    if not filter_zero_std:
        groups = sample(draw(batch_size))
        stats.prompts_drawn = stats.groups_kept = len(groups)
        stats.generated_tokens = sum(len(r) for g in groups for r in g.responses)
        return groups, stats
    kept: list[Group] = []
    dropped: list[Group] = []
    for _ in range(max_draw_rounds):
        groups = sample(draw(over_sampling_batch_size or batch_size))
        stats.prompts_drawn += len(groups)
        stats.generated_tokens += sum(len(r) for g in groups for r in g.responses)
        keep = nonzero_std_filter(torch.tensor([g.rewards for g in groups], dtype=torch.float64))
        for group, ok in zip(groups, keep.tolist()):
            if ok:
                kept.append(group)
            else:
                dropped.append(group)
                stats.dropped_by_reward[group.rewards[0]] = stats.dropped_by_reward.get(group.rewards[0], 0) + 1
        if len(kept) >= batch_size:
            break
    kept = (kept + dropped)[:batch_size]
    stats.groups_kept = len(kept)
    return kept, stats
