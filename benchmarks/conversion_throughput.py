"""HF -> Megatron torch_dist conversion throughput and peak memory vs. `cp -r` of the same files.

Builds a synthetic DeepSeek-V3-shaped bf16 checkpoint (MLA attention, many routed experts,
>= 2 GB, several shards) in a temporary directory, converts it in a child process (so the peak
RSS is the conversion's: `os.wait4` rusage of that child), then times `cp -r` of the same source.
Page cache: nothing is dropped. The source was just written, so both the conversion and the copy
read it from the page cache; both write into the page cache without fsync. The copy runs after
the conversion. Temporary files are removed at the end.

    python benchmarks/conversion_throughput.py [--workdir DIR] [--experts N] [--shards N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

CHILD = """
import sys, time, resource
from kimi_core.checkpoint.torch_dist import convert_hf_to_torch_dist
if __name__ == "__main__":
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    convert_hf_to_torch_dist(sys.argv[1], sys.argv[2], thread_count=int(sys.argv[3]))
    print(f"CHILD seconds={time.perf_counter() - start:.3f} rss_after_import_kb={before}")
"""


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where to put temporary files (default: system temp)")
    parser.add_argument("--experts", type=int, default=112, help="routed experts per MoE layer")
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2, help="writer threads of the conversion")
    args = parser.parse_args()

    from kimi_core.checkpoint.synthetic import tiny_config, write_synthetic_hf_checkpoint

    config = tiny_config(vocab_size=32000, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
                         num_hidden_layers=7, first_k_dense_replace=1, num_attention_heads=8,
                         num_key_value_heads=8, n_routed_experts=args.experts, n_shared_experts=1,
                         q_lora_rank=384, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                         v_head_dim=64)
    root = Path(tempfile.mkdtemp(prefix="kimi-convert-bench-", dir=args.workdir))
    try:
        hf_dir = root / "hf"
        start = time.perf_counter()
        shapes = write_synthetic_hf_checkpoint(hf_dir, config, num_shards=args.shards)
        build_s = time.perf_counter() - start
        size_gb = dir_bytes(hf_dir) / 1e9

        proc_start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore"}
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(hf_dir), str(root / "td"), str(args.threads)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        out, err = child.stdout.read(), child.stderr.read()
        _, status, usage = os.wait4(child.pid, 0)
        if status != 0:
            raise SystemExit(f"conversion failed:\n{err[-3000:]}")
        fields = dict(f.split("=") for f in next(line for line in out.splitlines() if line.startswith("CHILD")).split()[1:])
        convert_s = float(fields["seconds"])
        peak_rss_gb = usage.ru_maxrss * 1024 / 1e9
        import_rss_gb = float(fields["rss_after_import_kb"]) * 1024 / 1e9
        process_s = time.perf_counter() - proc_start
        out_gb = dir_bytes(root / "td") / 1e9

        start = time.perf_counter()
        subprocess.run(["cp", "-r", str(hf_dir), str(root / "copy")], check=True)
        copy_s = time.perf_counter() - start

        convert_rate, copy_rate = size_gb / convert_s, size_gb / copy_s
        rows = [
            ("checkpoint", f"{size_gb:.2f} GB in {args.shards} shards, {len(shapes)} tensors, "
                           f"{args.experts} experts x 6 MoE layers (built in {build_s:.1f} s)"),
            ("torch_dist output", f"{out_gb:.2f} GB"),
            ("conversion (call)", f"{convert_s:.2f} s  -> {convert_rate:.3f} GB/s"),
            ("conversion (process)", f"{process_s:.2f} s incl. interpreter + megatron import"),
            ("cp -r (after conversion)", f"{copy_s:.2f} s  -> {copy_rate:.3f} GB/s"),
            ("ratio convert / copy", f"{convert_rate / copy_rate:.3f}"),
            ("peak RSS of conversion child", f"{peak_rss_gb:.3f} GB (after imports: {import_rss_gb:.3f} GB)"),
            ("page cache", "not dropped; source hot for both; no fsync in either"),
        ]
        width = max(len(r[0]) for r in rows)
        print(f"{'measure'.ljust(width)} | value")
        print(f"{'-' * width}-+-{'-' * 60}")
        for name, value in rows:
            print(f"{name.ljust(width)} | {value}")
        print(f"RESULT convert_gb_per_s={convert_rate:.3f} copy_gb_per_s={copy_rate:.3f} "
              f"ratio={convert_rate / copy_rate:.3f} peak_rss_gb={peak_rss_gb:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
