"""Streaming safetensors I/O: one tensor at a time, no mmap.

The `safetensors` package reads through a memory map, so every page it touches stays in the
process's resident set while the file is open; and `save_file` needs a whole shard in memory.
Conversion of a ~1 TB checkpoint must keep its resident memory near one tensor, so this module
reads a tensor with `os.preadv` into freshly allocated memory (thread-safe) and writes a shard by streaming
tensors after a header computed up front. The byte layout is the safetensors format
(8-byte little-endian header length, JSON header, raw little-endian tensor bytes); files written
here load with `safetensors.torch.load_file`, which the tests check. The directory layout
(index or single file) and the header are read by the torch-free `kimi_core.checkpoint.hf`.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from kimi_core.checkpoint.hf import INDEX_NAME, list_shards, read_safetensors_header

DTYPE_FROM_NAME: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAME_FROM_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_FROM_NAME.items()}


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, shared (no copy)."""
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12; the array is a buffer on 3.11 too
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte range in the file."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | Path) -> dict[str, TensorEntry]:
    """Parse the header of one safetensors file into `{key: TensorEntry}`."""
    path = Path(path)
    header, data_start = read_safetensors_header(path)
    entries: dict[str, TensorEntry] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in DTYPE_FROM_NAME:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        entries[key] = TensorEntry(path, key, DTYPE_FROM_NAME[info["dtype"]], tuple(info["shape"]),
                                   data_start + begin, data_start + end)
    return entries


def read_checkpoint_entries(hf_dir: str | Path) -> dict[str, TensorEntry]:
    """All tensors of an HF checkpoint dir (sharded with an index, or one `model.safetensors`).

    Raises ValueError when the index names a missing file, a key the index promises is not in
    the file it names, or a shard holds a key the index does not list.
    """
    listing = list_shards(hf_dir)
    entries: dict[str, TensorEntry] = {}
    for name in listing.files:
        entries.update(read_header(listing.root / name))
    for key, name in listing.weight_map.items():
        if key not in entries or entries[key].file.name != name:
            raise ValueError(f"{listing.index}: key {key!r} is not in shard {name!r}")
    unlisted = sorted(set(entries) - set(listing.weight_map)) if listing.weight_map else []
    if unlisted:
        raise ValueError(f"{listing.index}: shard tensors not listed in the index, e.g. {unlisted[:5]}")
    return entries


class TensorReader:
    """Reads tensors by `TensorEntry` with `os.preadv` (thread-safe; one descriptor per file)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def read(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor's bytes read straight into a new CPU tensor of `entry.shape`."""
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        view = _bytes_view(tensor)
        fd, done = self._fd(entry.file), 0
        while done < entry.nbytes:
            got = os.preadv(fd, [view[done:]], entry.begin + done)
            if got <= 0:
                raise ValueError(f"{entry.file}: tensor {entry.key!r} truncated ({done}/{entry.nbytes} bytes)")
            done += got
        return tensor

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_streaming(path: str | Path, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                    produce: Callable[[list[str]], Iterable[torch.Tensor]], *,
                    metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file whose tensors are produced in order, one group at a time.

    `specs` lists `(key, dtype, shape)` in file order; `produce(keys)` is called once with all
    keys and must yield their tensors in that order (a generator, so it can load lazily).
    Returns the number of bytes written.
    """
    specs = list(specs)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for key, dtype, shape in specs:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": NAME_FROM_DTYPE[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for (key, dtype, shape), tensor in zip(specs, produce([s[0] for s in specs]), strict=True):
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {key!r} is {tensor.dtype}{tuple(tensor.shape)}, "
                                 f"header says {dtype}{tuple(shape)}")
            f.write(_bytes_view(tensor.contiguous()))
    return 8 + len(header_bytes) + offset


def write_index(hf_dir: str | Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write `model.safetensors.index.json` (keys sorted, as HF writes them)."""
    index = {"metadata": {"total_size": total_size},
             "weight_map": dict(sorted(weight_map.items()))}
    (Path(hf_dir) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
