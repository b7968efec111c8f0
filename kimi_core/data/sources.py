"""Where prompt data comes from: fsspec URLs, the format of each, streaming hashes, row iteration.

Sources (all opened through fsspec; `storage_options` is passed to the filesystem):
- a plain path or `file://...` — the local filesystem;
- `s3://bucket/key` — s3fs; e.g. `storage_options={"client_kwargs": {"endpoint_url": URL}}`
  for an S3-compatible server, plus `key`/`secret` or the usual AWS environment;
- `hf://datasets/<owner>/<repo>/<file>` — huggingface_hub's `HfFileSystem` (needs network access
  to the Hub and, for gated sets, `storage_options={"token": ...}`);
- `synthetic://arith?...` — generated in memory, see `kimi_core.data.synthetic`.

Formats by extension: `.jsonl` (optionally compressed: `.jsonl.gz`, `.jsonl.bz2`, `.jsonl.xz`,
`.jsonl.zst`, decompressed by fsspec) and `.parquet`. The source sha256 is over the stored bytes
(compressed, if so), read in 1 MiB chunks.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from typing import IO, Any, Literal

import fsspec
from fsspec.utils import infer_compression

from kimi_core.data import rows as rowfmt
from kimi_core.data.synthetic import rows_from_uri

Format = Literal["jsonl", "parquet"]
_CHUNK = 1 << 20
_BOM = b"\xef\xbb\xbf"


def is_synthetic(source: str) -> bool:
    """True for `synthetic://` sources (generated, not read from storage)."""
    return source.startswith("synthetic://")


def source_format(source: str) -> Format:
    """`jsonl` or `parquet`, from the file extension (after any compression suffix)."""
    if is_synthetic(source):
        return "jsonl"
    path = source.split("?", 1)[0]
    compression = infer_compression(path)
    stem = path.rsplit(".", 1)[0] if compression else path
    if stem.endswith(".jsonl"):
        return "jsonl"
    if stem.endswith(".parquet") and not compression:
        return "parquet"
    raise ValueError(
        f"cannot tell the format of data source {source!r}: expected a name ending in .jsonl "
        "(optionally .gz/.bz2/.xz/.zst) or .parquet"
    )


def _synthetic_bytes(source: str) -> bytes:
    rows = rows_from_uri(source)
    return b"".join(rowfmt.dumps(row) + b"\n" for row in rows)


def _open(source: str, storage_options: dict[str, Any] | None, compression: str | None) -> IO[bytes]:
    """An open binary file for `source` (a context manager)."""
    if is_synthetic(source):
        return io.BytesIO(_synthetic_bytes(source))
    try:
        opened: IO[bytes] = fsspec.open(source, "rb", compression=compression, **(storage_options or {})).open()
        return opened
    except FileNotFoundError:
        raise FileNotFoundError(f"data source not found: {source}") from None


def source_sha256(source: str, *, storage_options: dict[str, Any] | None = None) -> tuple[str, int]:
    """`(sha256 hex, size in bytes)` of the stored bytes of `source`, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with _open(source, storage_options, compression=None) as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def iter_records(source: str, *, storage_options: dict[str, Any] | None = None) -> Iterator[tuple[str, Any]]:
    """Yield `(location, row)` for every record of `source`, in order.

    `location` is `source:LINE` (1-based line number) for JSONL and `source:row I` (0-based row
    index, as pyarrow and pandas count) for parquet. Blank JSONL lines are not records. A JSONL
    line that is not JSON yields `row = DataValidationError` (the caller decides strict or skip).
    """
    if source_format(source) == "parquet":
        yield from _iter_parquet(source, storage_options)
    else:
        yield from _iter_jsonl(source, storage_options)


def _iter_jsonl(source: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[str, Any]]:
    with _open(source, storage_options, compression="infer") as handle:
        for lineno, line in enumerate(handle, 1):
            if lineno == 1 and line.startswith(_BOM):
                line = line[len(_BOM):]
            if not line.strip():
                continue
            location = f"{source}:{lineno}"
            try:
                yield location, rowfmt.loads(line)
            except ValueError as exc:
                yield location, rowfmt.DataValidationError(location, f"not valid JSON ({exc})")


def _iter_parquet(source: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # noqa: PLC0415 - pyarrow (slow import) only for parquet sources

    with _open(source, storage_options, compression=None) as handle:
        try:
            table = pq.ParquetFile(handle)
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends for a corrupt file
            raise rowfmt.DataValidationError(source, f"not a readable parquet file ({exc})") from exc
        index = 0
        for batch in table.iter_batches(batch_size=8192):
            for row in batch.to_pylist():
                yield f"{source}:row {index}", row
                index += 1
