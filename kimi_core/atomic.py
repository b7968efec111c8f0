"""Atomic file writes: the one implementation every domain module uses.

A file is written to a temp file in the same directory (named `.{name}.tmp-XXXX`, so
`TMP_MARK` finds the leftovers of a crash), fsynced, renamed over the target with `os.replace`,
and the directory is fsynced so the rename is durable. A crash at any instant leaves either the
old or the new content, never a torn one; a write that raises removes its temp file and leaves
the target as it was. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

TMP_MARK = ".tmp-"
"""Part of the name of every temp file (and temp checkpoint directory) beside its target."""


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(
    path: str | os.PathLike[str], *, before_replace: Callable[[], None] | None = None
) -> Iterator[IO[bytes]]:
    """Yield a binary temp file beside `path`; on normal exit it becomes `path` atomically.

    The parent directory is created if missing. On normal exit: flush, fsync, call
    `before_replace` (e.g. to drop a stale "done" marker), `os.replace` onto `path`, fsync the
    directory. On an exception the temp file is removed and `path` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TMP_MARK}")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (see `open_atomic`)."""
    with open_atomic(path) as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically (see `open_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))
