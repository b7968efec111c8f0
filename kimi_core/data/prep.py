"""The prepare_data stage: read a prompt source, validate, dedup, write canonical JSONL + stats.

Output under `out_dir` (a local or shared-filesystem directory):
- `{name}.jsonl` — one row per line, `{"prompt": <as given>, "label": str[, "metadata": {...}]}`,
  compact UTF-8 JSON, rows in source order with exact-duplicate prompts dropped (first kept);
- `{name}.stats.json` — counts, error and conflicting-label examples, sha256 of the source and of
  the output, `PREP_VERSION`, the options, and prompt-length percentiles in tokens when a
  `count_tokens` is given.

Both files are written to a temp file, fsynced and renamed; the stats file goes last (and an
older one is removed before the output is replaced), so a crash never leaves an output that looks
done. A second call with the same source bytes, `PREP_VERSION` and options finds the stats, checks
the output's sha256, and returns the cached result without reprocessing.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec

from kimi_core.atomic import open_atomic
from kimi_core.data import rows as rowfmt
from kimi_core.data.rows import DataValidationError, RowKeys
from kimi_core.data.sources import iter_records, source_format, source_sha256
from kimi_core.data.stats import load_cached_stats, write_stats

PREP_VERSION = "1"
MAX_EXAMPLES = 5
_FLUSH_BYTES = 1 << 20

CountTokens = Callable[[list[dict[str, Any]]], int]


@dataclass(frozen=True)
class PrepResult:
    """What `prepare_dataset` produced (paths are local filesystem paths)."""

    path: str
    stats_path: str
    rows_in: int
    rows_out: int
    duplicates: int
    conflicting_labels: int
    errors: int
    source_sha256: str
    output_sha256: str
    cached: bool

    @classmethod
    def from_stats(cls, stats: dict[str, Any], *, path: Path, stats_path: Path, cached: bool) -> PrepResult:
        return cls(
            path=str(path), stats_path=str(stats_path), rows_in=stats["rows_in"], rows_out=stats["rows_out"],
            duplicates=stats["duplicates"], conflicting_labels=stats["conflicting_labels"],
            errors=stats["errors"], source_sha256=stats["source_sha256"],
            output_sha256=stats["output_sha256"], cached=cached,
        )


@dataclass
class _Tally:
    """Counters and the first few examples gathered while rows stream through."""

    rows_in: int = 0
    rows_out: int = 0
    duplicates: int = 0
    conflicting_labels: int = 0
    errors: int = 0
    error_examples: list[dict[str, str]] = field(default_factory=list)
    conflict_examples: list[dict[str, Any]] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)

    def error(self, location: str, reason: str) -> None:
        self.errors += 1
        if len(self.error_examples) < MAX_EXAMPLES:
            self.error_examples.append({"location": location, "reason": reason})

    def conflict(self, first: tuple[str, str], location: str, label: str) -> None:
        self.conflicting_labels += 1
        if len(self.conflict_examples) < MAX_EXAMPLES:
            self.conflict_examples.append(
                {"first": first[1], "first_label": first[0], "duplicate": location, "duplicate_label": label}
            )


class _HashingWriter:
    """Appends bytes to an open file in ~1 MiB writes while computing their sha256."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0
        self._buffer: list[bytes] = []
        self._buffered = 0

    def write(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        block = b"".join(self._buffer)
        self.handle.write(block)
        self.digest.update(block)
        self.size += len(block)
        self._buffer, self._buffered = [], 0


def _process(
    records: Iterable[tuple[str, Any]], *, keys: RowKeys, strict: bool,
    count_tokens: CountTokens | None, writer: _HashingWriter,
) -> _Tally:
    """Validate, dedup and write every record; raises `DataValidationError` at the first bad row if strict."""
    tally = _Tally()
    seen: dict[str | bytes, tuple[str, str]] = {}  # prompt key -> (label, location) of its first row
    for location, row in records:
        tally.rows_in += 1
        checked = row.reason if isinstance(row, DataValidationError) else rowfmt.check_row(row, keys)
        if isinstance(checked, str):
            if strict:
                raise DataValidationError(location, checked)
            tally.error(location, checked)
            continue
        prompt, label, metadata = checked
        key = rowfmt.prompt_key(prompt)
        first = seen.get(key)
        if first is not None:
            tally.duplicates += 1
            if first[0] != label:
                tally.conflict(first, location, label)
            continue
        seen[key] = (label, location)
        out: dict[str, Any] = {"prompt": prompt, "label": label}
        if metadata is not None:
            out["metadata"] = metadata
        writer.write(rowfmt.dumps(out) + b"\n")
        tally.rows_out += 1
        if count_tokens is not None:
            tally.token_counts.append(int(count_tokens(rowfmt.as_messages(prompt))))
    return tally


def token_percentiles(counts: list[int]) -> dict[str, int] | None:
    """Nearest-rank percentiles `{p50, p90, p99, max}`: `p_q = sorted[ceil(q/100 * n) - 1]`."""
    if not counts:
        return None
    ordered = sorted(counts)

    def rank(q: int) -> int:
        return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1]}


def _local_dir(out_dir: str | os.PathLike[str]) -> Path:
    text = os.fspath(out_dir)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise ValueError(f"out_dir must be a local or shared-filesystem directory, got {text!r}")
    return Path(text)


def _check_args(name: str, on_error: str) -> None:
    if on_error not in ("strict", "skip"):
        raise ValueError(f"on_error must be 'strict' or 'skip', got {on_error!r}")
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        raise ValueError(f"name must be a plain file stem (no '/', not starting with '.'), got {name!r}")


def _callable_id(fn: CountTokens | None) -> str | None:
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


@dataclass(frozen=True)
class _Target:
    """Where `prepare_dataset` writes, and what identifies its output (source bytes, version, options)."""

    directory: Path
    path: Path
    stats_path: Path
    identity: dict[str, Any]
    source_bytes: int

    @classmethod
    def of(cls, source: str, *, out_dir: str | os.PathLike[str], name: str, input_key: str, label_key: str,
           metadata_key: str | None, on_error: str, count_tokens: CountTokens | None,
           storage_options: dict[str, Any] | None) -> _Target:
        _check_args(name, on_error)
        directory = _local_dir(out_dir)
        options = {
            "input_key": input_key, "label_key": label_key, "metadata_key": metadata_key,
            "on_error": on_error, "count_tokens": _callable_id(count_tokens), "format": source_format(source),
        }
        source_sha, source_bytes = source_sha256(source, storage_options=storage_options)
        identity = {"source_sha256": source_sha, "prep_version": PREP_VERSION, "options": options}
        return cls(directory, directory / f"{name}.jsonl", directory / f"{name}.stats.json", identity, source_bytes)

    def reusable(self) -> PrepResult | None:
        cached = load_cached_stats(self.stats_path, self.path, self.identity)
        if cached is None:
            return None
        return PrepResult.from_stats(cached, path=self.path, stats_path=self.stats_path, cached=True)


def find_prepared(
    source: str,
    *,
    out_dir: str | os.PathLike[str],
    name: str,
    input_key: str = "prompt",
    label_key: str = "label",
    metadata_key: str | None = None,
    on_error: Literal["strict", "skip"] = "strict",
    count_tokens: CountTokens | None = None,
    storage_options: dict[str, Any] | None = None,
) -> PrepResult | None:
    """What `prepare_dataset` with the same arguments would return from its cache (`cached=True`),
    or None when it would have work to do. Reads the source's bytes (its hash), writes nothing."""
    return _Target.of(source, out_dir=out_dir, name=name, input_key=input_key, label_key=label_key,
                      metadata_key=metadata_key, on_error=on_error, count_tokens=count_tokens,
                      storage_options=storage_options).reusable()


def prepare_dataset(
    source: str,
    *,
    out_dir: str | os.PathLike[str],
    name: str,
    input_key: str = "prompt",
    label_key: str = "label",
    metadata_key: str | None = None,
    on_error: Literal["strict", "skip"] = "strict",
    count_tokens: CountTokens | None = None,
    storage_options: dict[str, Any] | None = None,
) -> PrepResult:
    """Prepare `source` (see `kimi_core.data.sources` for the URLs) into `{out_dir}/{name}.jsonl`.

    `on_error="strict"` raises `DataValidationError` (a `ValueError`) naming `source:line` at the
    first bad row; `"skip"` drops bad rows and counts them. `count_tokens(messages) -> int` adds
    prompt-length percentiles (a string prompt is passed as one user message); the cache key holds
    its qualified name, not its code. Raises `DataValidationError` when no valid row remains.
    `storage_options` goes to fsspec and is never written to the stats.
    """
    started = time.perf_counter()
    target = _Target.of(source, out_dir=out_dir, name=name, input_key=input_key, label_key=label_key,
                        metadata_key=metadata_key, on_error=on_error, count_tokens=count_tokens,
                        storage_options=storage_options)
    if (cached := target.reusable()) is not None:
        return cached
    keys = RowKeys(input_key=input_key, label_key=label_key, metadata_key=metadata_key)
    directory, path, stats_path, identity = target.directory, target.path, target.stats_path, target.identity
    source_bytes = target.source_bytes

    directory.mkdir(parents=True, exist_ok=True)
    records = iter_records(source, storage_options=storage_options)
    with open_atomic(path, before_replace=lambda: stats_path.unlink(missing_ok=True)) as handle:
        writer = _HashingWriter(handle)
        tally = _process(records, keys=keys, strict=on_error == "strict", count_tokens=count_tokens, writer=writer)
        writer.flush()
        if tally.rows_out == 0:
            raise DataValidationError(
                source,
                f"no valid rows ({tally.rows_in} rows in, {tally.errors} bad; first: {tally.error_examples[:1]})",
            )
    stats = {
        **identity, "source": source, "source_bytes": source_bytes,
        "rows_in": tally.rows_in, "rows_out": tally.rows_out, "duplicates": tally.duplicates,
        "conflicting_labels": tally.conflicting_labels, "conflicting_label_examples": tally.conflict_examples,
        "errors": tally.errors, "error_examples": tally.error_examples,
        "output_sha256": writer.digest.hexdigest(), "output_bytes": writer.size,
        "prompt_tokens": token_percentiles(tally.token_counts),
        "prep_seconds": round(time.perf_counter() - started, 4),
    }
    write_stats(stats_path, stats)
    return PrepResult.from_stats(stats, path=path, stats_path=stats_path, cached=False)


def read_prepared(
    path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The rows of a prepared `{name}.jsonl` (any fsspec URL), in order.

    Raises `ValueError` naming `path:line` when a line is not a JSON object.
    """
    rows: list[dict[str, Any]] = []
    with fsspec.open(os.fspath(path), "rb", **(storage_options or {})) as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = rowfmt.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: not a JSON object")
            rows.append(row)
    return rows
