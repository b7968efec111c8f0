"""INT4 weight quantization of routed experts (QAT fake-quant, compressed-tensors packing).

Per row, in groups of `group_size` along the input dim (docs/design.md §8):
    scale = max(max|w_group| / 7, 1e-5)        rounded to the weight dtype (it is stored so)
    q     = clamp(round(w / scale), -7, 7)      computed in fp32
    dq    = q * scale                           computed in fp32, cast to the weight dtype
Packing (compressed-tensors `pack-quantized`): `q + 8` in 4 bits, 8 values per int32 along the
input dim, value j of each group of 8 in bits 4j..4j+3; tensors `weight_packed` int32
[out, in/8], `weight_scale` [out, in/group] (weight dtype), `weight_shape` int64 [2].
Because the scale is rounded to the stored dtype in both places, `unpack_int4(pack_int4(w))`
equals `fake_quantize_int4(w)` bit for bit: training sees exactly what the rollout engine serves.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from kimi_core.checkpoint.hf import INDEX_NAME
from kimi_core.checkpoint.safetensors_io import (
    TensorEntry,
    TensorReader,
    read_checkpoint_entries,
    write_index,
    write_streaming,
)

QMAX = 7
SCALE_MIN = 1e-5
ROUTED_EXPERT_WEIGHT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
DEFAULT_IGNORE = ["lm_head", r"re:.*self_attn.*", r"re:.*shared_experts.*",
                  r"re:.*mlp\.(gate|up|gate_up|down)_proj.*", r"re:.*mlp\.gate$"]
PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")


def _check_2d(w: torch.Tensor, group_size: int) -> None:
    if w.dim() != 2 or w.shape[1] % group_size or group_size % 8:
        raise ValueError(f"int4: need a 2-D weight whose input dim is a multiple of group_size "
                         f"{group_size} (itself a multiple of 8), got shape {tuple(w.shape)}")


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in] in [-7, 7], scale [out, in/group] in w's dtype)."""
    _check_2d(w, group_size)
    out_dim, in_dim = w.shape
    groups = w.detach().float().reshape(out_dim, in_dim // group_size, group_size)
    scale = (groups.abs().amax(dim=-1) / QMAX).clamp_min(SCALE_MIN).to(w.dtype)
    q = torch.clamp(torch.round(groups / scale.float().unsqueeze(-1)), -QMAX, QMAX)
    return q.to(torch.int8).reshape(out_dim, in_dim), scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`q * scale` per group in fp32, cast to scale's dtype; q [out, in], scale [out, in/group]."""
    out_dim, in_dim = q.shape
    group_size = in_dim // scale.shape[1]
    dq = q.float().reshape(out_dim, -1, group_size) * scale.float().unsqueeze(-1)
    return dq.reshape(out_dim, in_dim).to(scale.dtype)


def fake_quantize_int4(w: torch.Tensor, group_size: int = 32) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient: forward dq, d out / d w = 1.

    `w + (dq - w).detach()` is evaluated in fp32 (exact there for these operands) and cast back,
    so the forward value equals `dq` exactly also for bf16 weights.
    """
    dq = dequantize_int4(*quantize_int4(w, group_size))
    w32 = w.float()
    return (w32 + (dq.float() - w32).detach()).to(w.dtype)


def pack_int4(w: torch.Tensor, group_size: int = 32) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of one Linear weight [out, in] (see module docstring)."""
    q, scale = quantize_int4(w, group_size)
    out_dim, in_dim = q.shape
    nibbles = (q.to(torch.int64) + 8).reshape(out_dim, in_dim // 8, 8)
    shifts = torch.arange(8, dtype=torch.int64) * 4
    words = (nibbles << shifts).sum(dim=-1)  # disjoint bits: sum == bitwise or
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return {"weight_packed": words, "weight_scale": scale,
            "weight_shape": torch.tensor([out_dim, in_dim], dtype=torch.int64)}


def unpack_int4(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                weight_shape: torch.Tensor) -> torch.Tensor:
    """The dequantized weight [out, in] in `weight_scale`'s dtype."""
    out_dim, in_dim = (int(v) for v in weight_shape.tolist())
    if tuple(weight_packed.shape) != (out_dim, in_dim // 8) or weight_packed.dtype != torch.int32:
        raise ValueError(f"int4: weight_packed {weight_packed.dtype}{tuple(weight_packed.shape)} does not "
                         f"match weight_shape [{out_dim}, {in_dim}]")
    words = weight_packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, dtype=torch.int64) * 4
    q = ((words.unsqueeze(-1) >> shifts) & 0xF) - 8
    return dequantize_int4(q.reshape(out_dim, in_dim).to(torch.int8), weight_scale)


def matches_ignore(module: str, patterns: list[str]) -> bool:
    """compressed-tensors target semantics: `re:` prefix = regex match, else the exact name."""
    return any(re.match(p[3:], module) if p.startswith("re:") else p == module for p in patterns)


def quantization_config(group_size: int, ignore: list[str]) -> dict[str, object]:
    """The `quantization_config` block of an INT4 compressed-tensors checkpoint."""
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "kv_cache_scheme": None, "ignore": list(ignore),
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None, "output_activations": None}}}


def _copy_side_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX_NAME, "config.json"):
            shutil.copy2(f, dst / f.name)


def _by_file(entries: dict[str, TensorEntry]) -> dict[Path, list[TensorEntry]]:
    files: dict[Path, list[TensorEntry]] = {}
    for entry in sorted(entries.values(), key=lambda e: (e.file.name, e.begin)):
        files.setdefault(entry.file, []).append(entry)
    return files


def quantize_checkpoint_int4(hf_dir: str | Path, out_dir: str | Path, *, group_size: int = 32,
                             ignore: list[str] | None = None) -> Path:
    """BF16 HF checkpoint -> INT4 compressed-tensors copy (routed-expert Linear weights only).

    `ignore` patterns are added to DEFAULT_IGNORE (attention, shared experts, dense MLP, router
    gates, lm_head); a routed-expert weight matching one stays unquantized. Raises ValueError if
    a 2-D non-embedding weight would stay unquantized without an ignore pattern covering it.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    patterns = DEFAULT_IGNORE + [p for p in (ignore or []) if p not in DEFAULT_IGNORE]
    entries = read_checkpoint_entries(hf_dir)
    quantized = {k for k in entries if ROUTED_EXPERT_WEIGHT.match(k)
                 and not matches_ignore(k.removesuffix(".weight"), patterns)}
    for key, entry in entries.items():
        module = key.removesuffix(".weight")
        if (key.endswith(".weight") and len(entry.shape) == 2 and key not in quantized
                and "embed_tokens" not in key and not matches_ignore(module, patterns)):
            raise ValueError(f"int4: {module} is neither quantized nor covered by an ignore pattern")
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    with TensorReader() as reader:
        for file, file_entries in _by_file(entries).items():
            specs = []
            for e in file_entries:
                if e.key in quantized:
                    _check_2d(torch.empty(e.shape, device="meta"), group_size)
                    prefix, (rows, cols) = e.key.removesuffix(".weight"), e.shape
                    specs += [(f"{prefix}.weight_packed", torch.int32, (rows, cols // 8)),
                              (f"{prefix}.weight_scale", e.dtype, (rows, cols // group_size)),
                              (f"{prefix}.weight_shape", torch.int64, (2,))]
                else:
                    specs.append((e.key, e.dtype, e.shape))

            def produce(keys: list[str], todo: list[TensorEntry] = file_entries) -> Iterator[torch.Tensor]:
                for e in todo:
                    tensor = reader.read(e)
                    if e.key in quantized:
                        yield from pack_int4(tensor, group_size).values()
                    else:
                        yield tensor
            write_streaming(out_dir / file.name, specs, produce)
            weight_map.update({k: file.name for k, _, _ in specs})
            total += sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, d, s in specs)
    write_index(out_dir, weight_map, total)
    _copy_side_files(hf_dir, out_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config(group_size, patterns)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def dequantize_checkpoint_to_bf16(int4_dir: str | Path, out_dir: str | Path) -> Path:
    """INT4 compressed-tensors checkpoint -> its dequantized copy (`quantization_config` removed)."""
    int4_dir, out_dir = Path(int4_dir), Path(out_dir)
    entries = read_checkpoint_entries(int4_dir)
    prefixes = {k.rsplit(".", 1)[0] for k in entries if k.endswith(".weight_packed")}
    for key in entries:
        prefix, _, suffix = key.rpartition(".")
        if suffix in PACKED_SUFFIXES and any(f"{prefix}.{s}" not in entries for s in PACKED_SUFFIXES):
            raise ValueError(f"int4: {prefix} lacks one of {PACKED_SUFFIXES} in {int4_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    with TensorReader() as reader:
        for file, file_entries in _by_file(entries).items():
            specs, sources = [], []
            for e in file_entries:
                prefix, _, suffix = e.key.rpartition(".")
                if prefix in prefixes and suffix != "weight_packed":
                    continue
                if prefix in prefixes:
                    shape = tuple(reader.read(entries[f"{prefix}.weight_shape"]).tolist())
                    specs.append((f"{prefix}.weight", entries[f"{prefix}.weight_scale"].dtype, shape))
                else:
                    specs.append((e.key, e.dtype, e.shape))
                sources.append(e)

            def produce(keys: list[str], todo: list[TensorEntry] = sources) -> Iterator[torch.Tensor]:
                for e in todo:
                    prefix = e.key.rpartition(".")[0]
                    if e.key.endswith(".weight_packed") and prefix in prefixes:
                        yield unpack_int4(*(reader.read(entries[f"{prefix}.{s}"]) for s in PACKED_SUFFIXES))
                    else:
                        yield reader.read(e)
            write_streaming(out_dir / file.name, specs, produce)
            weight_map.update({k: file.name for k, _, _ in specs})
            total += sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, d, s in specs)
    write_index(out_dir, weight_map, total)
    _copy_side_files(int4_dir, out_dir)
    config = json.loads((int4_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
