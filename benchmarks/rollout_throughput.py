"""Rollout throughput on CPU: our batched KV-cache sampler vs ``transformers`` generate.

Same random tiny Kimi-shaped weights (saved by us, loaded by ``DeepseekV3ForCausalLM``), same
left-padded prompts, same batch, temperature 1, top_p 1, no stop tokens, so both produce exactly
``batch * max_new_tokens`` tokens. A greedy run of each is compared token by token as a sanity
check. Prints a table and ends with one ``RESULT`` line.

Throughput = generated tokens / wall seconds of a whole ``generate`` call (prefill included),
median over alternating runs. Usage:
python benchmarks/rollout_throughput.py [--hidden 128|256] [--threads 1] [--batch 32] [--max-new-tokens 64] [--breakdown]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import transformers

from kimi_core.model import KimiForCausalLM, generate, save_pretrained, tiny_config

VOCAB = 300


def bench_config(hidden: int):
    """The local-recipe-sized flavor: 4 layers, vocab 300, all mechanisms on; ``hidden`` 128 or 256."""
    return tiny_config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=512,
    )


def make_prompts(n: int, *, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(32, 49, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in lengths]


def ours(model: KimiForCausalLM, prompts: list[list[int]], *, new: int, greedy: bool, seed: int) -> list[list[int]]:
    out = generate(
        model, prompts, max_new_tokens=new, temperature=0.0 if greedy else 1.0, top_p=1.0,
        stop_token_ids=[], pad_token_id=0, generator=torch.Generator().manual_seed(seed),
    )
    return out.tokens


def theirs(hf, prompts: list[list[int]], *, new: int, greedy: bool, seed: int) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    sampling = {} if greedy else dict(temperature=1.0, top_p=1.0, top_k=0)
    with torch.inference_mode():
        seqs = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=not greedy,
            eos_token_id=None, pad_token_id=0, **sampling,
        )
    return seqs[:, width:].tolist()


def timed_pair(
    first: Callable[[], list[list[int]]], second: Callable[[], list[list[int]]], *, repeats: int
) -> tuple[list[float], list[float], int, int]:
    """Run the two engines alternately ``repeats`` times (so load swings hit both alike);
    returns both lists of seconds and the tokens one run of each produced."""
    times: tuple[list[float], list[float]] = ([], [])
    produced = [0, 0]
    for _ in range(repeats):
        for i, fn in enumerate((first, second)):
            start = time.perf_counter()
            produced[i] = sum(len(t) for t in fn())
            times[i].append(time.perf_counter() - start)
    return times[0], times[1], produced[0], produced[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a small shared CPU box, OpenMP spinning "
                             "against other jobs makes 2+ threads erratic for both engines)")
    parser.add_argument("--hidden", type=int, default=128, choices=(128, 256))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time prefill + first token (max_new_tokens=1) of each engine, to split "
                             "the medians into prefill and per-step decode cost")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    cfg = bench_config(args.hidden)
    torch.manual_seed(0)
    model = KimiForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, cfg, tmp)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    prompts = make_prompts(args.batch, seed=1)
    new = args.max_new_tokens

    greedy_ours = ours(model, prompts, new=new, greedy=True, seed=0)  # also warms both up
    greedy_theirs = theirs(hf, prompts, new=new, greedy=True, seed=0)
    same = sum(a == b for ra, rb in zip(greedy_ours, greedy_theirs) for a, b in zip(ra, rb))
    t_ours, t_hf, n_ours, n_hf = timed_pair(
        lambda: ours(model, prompts, new=new, greedy=False, seed=2),
        lambda: theirs(hf, prompts, new=new, greedy=False, seed=2),
        repeats=args.repeats,
    )
    med_ours, med_hf = statistics.median(t_ours), statistics.median(t_hf)
    ours_tps, hf_tps = n_ours / med_ours, n_hf / med_hf
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model: {cfg.num_hidden_layers} layers (first dense), hidden {cfg.hidden_size}, "
          f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok} + shared, MLA, YaRN, vocab {cfg.vocab_size}")
    print(f"batch {len(prompts)}, prompt lengths {min(map(len, prompts))}-{max(map(len, prompts))} "
          f"(left-padded), {new} new tokens each, temperature 1, top_p 1, no stop tokens")
    print(f"torch threads {torch.get_num_threads()} of {os.cpu_count()} cores, load average (1 min) {load:.2f}, "
          f"{args.repeats} alternating runs each")
    print(f"greedy agreement with transformers: {same}/{len(prompts) * new} tokens")
    print(f"{'engine':<14}{'tokens':>8}{'median s':>10}{'best s':>9}{'tokens/s':>11}")
    print(f"{'ours':<14}{n_ours:>8}{med_ours:>10.3f}{min(t_ours):>9.3f}{ours_tps:>11.1f}")
    print(f"{'transformers':<14}{n_hf:>8}{med_hf:>10.3f}{min(t_hf):>9.3f}{hf_tps:>11.1f}")
    if args.breakdown:
        p_ours, p_hf, _, _ = timed_pair(
            lambda: ours(model, prompts, new=1, greedy=False, seed=2),
            lambda: theirs(hf, prompts, new=1, greedy=False, seed=2),
            repeats=args.repeats,
        )
        for name, full, first in (("ours", med_ours, statistics.median(p_ours)),
                                  ("transformers", med_hf, statistics.median(p_hf))):
            step_ms = (full - first) / max(new - 1, 1) * 1e3
            print(f"breakdown {name:<13} prefill+first token {first * 1e3:7.1f} ms, decode {step_ms:6.2f} ms/step")
    print(f"RESULT rollout_tokens_per_s={ours_tps:.1f} transformers_tokens_per_s={hf_tps:.1f} "
          f"ratio={ours_tps / hf_tps:.2f}")


if __name__ == "__main__":
    main()
