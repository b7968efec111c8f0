"""Rollout throughput on CPU: our batched KV-cache sampler vs ``transformers`` generate.

Same random tiny Kimi-shaped weights (saved once by us; loaded by our ``load_model`` and by
``DeepseekV3ForCausalLM``), same left-padded prompts, same batch, temperature 1, top_p 1, no stop
tokens, so both produce exactly ``batch * max_new_tokens`` tokens. A greedy run of each is compared
token by token as a sanity check. Prints a table and ends with one ``RESULT`` line.

Each engine runs in a fresh process of its own (``--side``), the two alternating for ``--rounds``
rounds: in one shared process, what one engine leaves in the allocator (glibc's heap thresholds)
changed how many fresh pages the other touched by up to 8x (100k+ page faults per call), so the
ratio measured the allocator's history as much as the engines. Throughput = generated tokens /
wall seconds of a whole ``generate`` call (prefill included), median over all timed runs of all
rounds. ``--samples-per-prompt n`` makes the batch GRPO-shaped: ``batch / n`` distinct prompts,
each ``n`` times in a row (the local recipe samples 32 prompts x 8). Usage:
python benchmarks/rollout_throughput.py [--hidden 128|256] [--threads 1] [--batch 32] [--max-new-tokens 64]
    [--samples-per-prompt 1] [--rounds 3] [--repeats 5] [--breakdown]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from kimi_core.model import KimiForCausalLM, generate, load_model, save_pretrained, tiny_config

VOCAB = 300
SIDES = ("ours", "transformers")


def bench_config(hidden: int):
    """The local-recipe-sized flavor: 4 layers, vocab 300, all mechanisms on; ``hidden`` 128 or 256."""
    return tiny_config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=512,
    )


def make_prompts(n: int, *, seed: int, samples_per_prompt: int = 1) -> list[list[int]]:
    """``n`` rows: ``n / samples_per_prompt`` random prompts of 32-48 tokens, each repeated in a row."""
    if n % samples_per_prompt:
        raise ValueError(f"batch {n} is not a multiple of samples_per_prompt {samples_per_prompt}")
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(32, 49, (n // samples_per_prompt,), generator=g).tolist()
    distinct = [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in lengths]
    return [p for p in distinct for _ in range(samples_per_prompt)]


def ours(model: KimiForCausalLM, prompts: list[list[int]], *, new: int, greedy: bool, seed: int) -> list[list[int]]:
    out = generate(
        model, prompts, max_new_tokens=new, temperature=0.0 if greedy else 1.0, top_p=1.0,
        stop_token_ids=[], pad_token_id=0, generator=torch.Generator().manual_seed(seed),
    )
    return out.tokens


def theirs(hf: Any, prompts: list[list[int]], *, new: int, greedy: bool, seed: int) -> list[list[int]]:
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
    result: list[list[int]] = seqs[:, width:].tolist()
    return result


def timed(fn: Callable[[], list[list[int]]], repeats: int) -> tuple[list[float], list[int], int]:
    """Seconds and minor page faults of ``repeats`` calls, and the tokens one call produced."""
    seconds, faults, produced = [], [], 0
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        produced = sum(len(t) for t in fn())
        seconds.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return seconds, faults, produced


def run_side(args: argparse.Namespace) -> None:
    """One engine in this process: a greedy run (warm-up and agreement check), then the timed runs;
    prints ``SIDE {json}``."""
    torch.set_num_threads(args.threads)
    if args.side == "ours":
        model: Any = load_model(args.weights).eval()
        engine: Callable[..., list[list[int]]] = ours
    else:
        import transformers  # only the transformers side needs it (seconds to import)

        transformers.logging.set_verbosity_error()
        model = transformers.DeepseekV3ForCausalLM.from_pretrained(args.weights, dtype=torch.float32).eval()
        engine = theirs
    prompts = make_prompts(args.batch, seed=1, samples_per_prompt=args.samples_per_prompt)
    greedy = engine(model, prompts, new=args.max_new_tokens, greedy=True, seed=0)
    seconds, faults, produced = timed(
        lambda: engine(model, prompts, new=args.max_new_tokens, greedy=False, seed=2), args.repeats
    )
    first: list[float] = []
    if args.breakdown:
        first = timed(lambda: engine(model, prompts, new=1, greedy=False, seed=2), args.repeats)[0]
    print("SIDE " + json.dumps(dict(side=args.side, seconds=seconds, faults=faults, tokens=produced,
                                    first=first, greedy=greedy)))


def side_in_subprocess(side: str, weights: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--side", side, "--weights", weights, "--threads", str(args.threads),
           "--batch", str(args.batch), "--max-new-tokens", str(args.max_new_tokens),
           "--samples-per-prompt", str(args.samples_per_prompt), "--repeats", str(args.repeats)]
    if args.breakdown:
        cmd.append("--breakdown")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("SIDE ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{side} side failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len("SIDE "):])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a small shared CPU box, OpenMP spinning "
                             "against other jobs makes 2+ threads erratic for both engines)")
    parser.add_argument("--hidden", type=int, default=128, choices=(128, 256))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--samples-per-prompt", type=int, default=1,
                        help="rows per distinct prompt (GRPO's n; default 1: every row its own prompt)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating pairs of engine processes")
    parser.add_argument("--repeats", type=int, default=5, help="timed generate calls per engine process")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time prefill + first token (max_new_tokens=1) of each engine, to split "
                             "the medians into prefill and per-step decode cost")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args)
        return
    cfg = bench_config(args.hidden)
    torch.manual_seed(0)
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(KimiForCausalLM(cfg), cfg, tmp)
        for _ in range(args.rounds):
            for side in SIDES:
                runs[side].append(side_in_subprocess(side, tmp, args))
    new = args.max_new_tokens
    rows = args.batch
    same = sum(a == b for ra, rb in zip(runs["ours"][0]["greedy"], runs["transformers"][0]["greedy"])
               for a, b in zip(ra, rb))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model: {cfg.num_hidden_layers} layers (first dense), hidden {cfg.hidden_size}, "
          f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok} + shared, MLA, YaRN, vocab {cfg.vocab_size}")
    print(f"batch {rows} rows ({rows // args.samples_per_prompt} distinct prompts x {args.samples_per_prompt}), "
          f"prompt lengths 32-48 (left-padded), {new} new tokens each, temperature 1, top_p 1, no stop tokens")
    print(f"torch threads {args.threads} of {os.cpu_count()} cores, load average (1 min) {load:.2f}; "
          f"{args.rounds} rounds of one process per engine, {args.repeats} timed calls each")
    print(f"greedy agreement with transformers: {same}/{rows * new} tokens")
    print(f"{'engine':<14}{'tokens':>8}{'median s':>10}{'best s':>9}{'tokens/s':>11}{'faults/call':>13}   per-round medians (s)")
    tps = {}
    for side in SIDES:
        seconds = [s for r in runs[side] for s in r["seconds"]]
        faults = statistics.median(f for r in runs[side] for f in r["faults"])
        rounds = " ".join(f"{statistics.median(r['seconds']):.3f}" for r in runs[side])
        tokens = runs[side][0]["tokens"]
        tps[side] = tokens / statistics.median(seconds)
        print(f"{side:<14}{tokens:>8}{statistics.median(seconds):>10.3f}{min(seconds):>9.3f}{tps[side]:>11.1f}"
              f"{faults:>13.0f}   {rounds}")
    if args.breakdown:
        for side in SIDES:
            full = statistics.median(s for r in runs[side] for s in r["seconds"])
            first = statistics.median(s for r in runs[side] for s in r["first"])
            step_ms = (full - first) / max(new - 1, 1) * 1e3
            print(f"breakdown {side:<13} prefill+first token {first * 1e3:7.1f} ms, decode {step_ms:6.2f} ms/step")
    print(f"RESULT rollout_tokens_per_s={tps['ours']:.1f} transformers_tokens_per_s={tps['transformers']:.1f} "
          f"ratio={tps['ours'] / tps['transformers']:.2f}")


if __name__ == "__main__":
    main()
