"""The two GEMM paths of ``FrozenWeight`` (the frozen sampling path's matmul) on this CPU.

For the product shapes the tiny model's sampler runs (decode at 32 and 256 rows, prefill at 1536),
times ``x @ W`` through ATen's ``matmul`` (MKL's sgemm) and through oneDNN
(``torch.ops.mkldnn._linear_pointwise``), one thread, and prints which path ``FrozenWeight`` takes
(``rows x outputs >= ONEDNN_MIN_PRODUCT``). Median of 5 batches of calls per cell; the ``RESULT``
line gives oneDNN's speed-up range over the shapes sent to it and over those kept on matmul. Usage:
python benchmarks/gemm_paths.py [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kimi_core.model.layers import ONEDNN_MIN_PRODUCT, FrozenWeight

SHAPES = [  # (rows, in, out): decode 32 / 256 rows and prefill 1536 rows of the benchmark model
    (32, 64, 128), (32, 128, 112), (32, 64, 192), (32, 128, 136), (32, 256, 128), (32, 128, 300), (32, 128, 512),
    (256, 128, 112), (256, 128, 128), (256, 128, 512), (384, 128, 128),
    (1536, 128, 112), (1536, 64, 192), (1536, 128, 512), (1536, 256, 128),
]


def per_call_us(fn: Callable[[], torch.Tensor], *, calls: int) -> float:
    for _ in range(max(calls // 10, 3)):
        fn()
    batches = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        batches.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this PyTorch build has no oneDNN: FrozenWeight uses matmul only")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"ONEDNN_MIN_PRODUCT={ONEDNN_MIN_PRODUCT}")
    print(f"{'rows x in x out':<18}{'matmul us':>11}{'oneDNN us':>11}{'speed-up':>10}{'  FrozenWeight takes'}")
    speedups: dict[bool, list[float]] = {True: [], False: []}
    for rows, k, n in SHAPES:
        line, speedup, onednn = compare(rows, k, n)
        speedups[onednn].append(speedup)
        print(line)
    taken, kept = speedups[True] or [float("nan")], speedups[False] or [float("nan")]
    print(f"RESULT onednn_taken_speedup_min={min(taken):.2f} onednn_taken_speedup_max={max(taken):.2f} "
          f"matmul_kept_onednn_speedup_max={max(kept):.2f}")


def compare(rows: int, k: int, n: int) -> tuple[str, float, bool]:
    """One table line (both paths' microseconds per ``[rows, k] @ [k, n]`` and the one taken),
    oneDNN's speed-up, and whether ``FrozenWeight`` takes oneDNN."""
    x, w_t = torch.randn(rows, k), torch.randn(k, n) / k**0.5
    weight = w_t.t().contiguous()
    calls = max(20, 200_000 // (rows * n))
    mkl = per_call_us(lambda: x @ w_t, calls=calls)
    dnnl = per_call_us(lambda: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""), calls=calls)
    onednn = FrozenWeight(w_t).takes_onednn(rows)
    line = f"{f'{rows} x {k} x {n}':<18}{mkl:>11.1f}{dnnl:>11.1f}{mkl / dnnl:>9.2f}x  {'oneDNN' if onednn else 'matmul'}"
    return line, mkl / dnnl, onednn

if __name__ == "__main__":
    main()
