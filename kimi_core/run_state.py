"""Run state on the shared filesystem: one source of truth under `{base_dir}/runs/{run_name}/`.

Layout (docs/design.md §4)::

    manifest.json                       stage records, MLflow run id, Slurm job ids, resume history
    checkpoints/iter_{rollout_id:07d}/  one complete checkpoint per saved rollout
    checkpoints/latest_checkpointed_iteration.txt   the last COMPLETE rollout id (written last)
    checkpoints/rollout/global_dataset_state_dict_{rollout_id}.pt   data position + RNG states
    data/  logs/
and `{base_dir}/mlflow.db` (default MLflow store shared by the runs under base_dir).

Plain POSIX paths, not fsspec: the protocol needs fcntl locks, fsync and atomic rename on a
shared filesystem, which object stores do not offer. Every file here is written atomically with
`kimi_core.atomic` (temp file in the same directory, fsync, `os.replace`), so a crash at any
instant leaves either the old or the new content, never a torn one.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kimi_core.atomic import TMP_MARK, fsync_dir, write_text_atomic

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
"""The tracker file (miles/Megatron name) holding the last complete iteration: `RunPaths.tracker`
of a run, and `{out}/TRACKER_FILENAME` of a torch_dist checkpoint (`release`)."""
RUNS_DIR = "runs"
"""`{base_dir}/RUNS_DIR/{run_name}` is a run's directory."""
CHECKPOINTS_DIR = "checkpoints"
"""The run's checkpoints (and tracker file) directory, inside the run directory."""
SLURM_DIR = "slurm"
"""The run's Slurm scripts and job output directory, inside the run directory."""
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def run_path(base_dir: str, run_name: str, *parts: str) -> str:
    """`{base_dir}/runs/{run_name}[/parts...]` as a plain POSIX string, neither resolved nor validated.

    The one definition of where a run lives: `RunPaths` builds its paths on it, and renderers
    call it directly, with placeholders such as `<base_dir>` for display.
    """
    return posixpath.join(base_dir, RUNS_DIR, run_name, *parts)


@dataclass(frozen=True)
class RunPaths:
    """Paths of one run. `RunPaths.of(base_dir, run_name)`; nothing is created until `ensure()`."""

    base_dir: Path
    run_name: str

    @classmethod
    def of(cls, base_dir: str | os.PathLike[str], run_name: str) -> RunPaths:
        """Validate `run_name` (letters, digits, `._-`; no slashes) and build the paths."""
        if not _RUN_NAME.match(run_name):
            raise ValueError(
                f"run_name {run_name!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return cls(base_dir=Path(base_dir).expanduser().resolve(), run_name=run_name)

    @property
    def run_dir(self) -> Path:
        return Path(run_path(str(self.base_dir), self.run_name))

    @property
    def manifest(self) -> Path:
        return self.run_dir / "manifest.json"

    @property
    def lock(self) -> Path:
        return self.run_dir / ".manifest.lock"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR

    @property
    def tracker(self) -> Path:
        return self.checkpoints / TRACKER_FILENAME

    @property
    def rollout_state(self) -> Path:
        return self.checkpoints / "rollout"

    @property
    def slurm(self) -> Path:
        """Slurm scripts and job output of the run (`{run}/slurm`)."""
        return self.run_dir / SLURM_DIR

    @property
    def data(self) -> Path:
        return self.run_dir / "data"

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def mlflow_db(self) -> Path:
        """Default SQLite MLflow store when `MLFLOW_TRACKING_URI` is unset: one per base dir, so
        the MLflow UI compares all runs under it (artifacts go to `{base_dir}/mlartifacts`)."""
        return self.base_dir / "mlflow.db"

    def ensure(self) -> RunPaths:
        """Create the run directories (idempotent) and return self."""
        for path in (self.run_dir, self.checkpoints, self.rollout_state, self.data, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        return self


# ----------------------------------------------------------------------------- checkpoints
class CheckpointError(RuntimeError):
    """The checkpoint directory contradicts its tracker file (or a commit is not allowed)."""


def checkpoint_dir(paths: RunPaths, rollout_id: int) -> Path:
    """`checkpoints/iter_{rollout_id:07d}` (the miles/Megatron name)."""
    if rollout_id < 0:
        raise ValueError(f"rollout_id must be >= 0, got {rollout_id}")
    return paths.checkpoints / f"iter_{rollout_id:07d}"


def dataset_state_path(paths: RunPaths, rollout_id: int) -> Path:
    """`checkpoints/rollout/global_dataset_state_dict_{rollout_id}.pt`; write it with
    `kimi_core.atomic.write_bytes_atomic` BEFORE `commit_checkpoint` so the tracker never points past it."""
    return paths.rollout_state / f"global_dataset_state_dict_{rollout_id}.pt"


def latest_checkpoint(paths: RunPaths) -> int | None:
    """The last complete rollout id from the tracker file, or None when nothing was saved.

    Stray temp dirs are ignored. A tracker naming a missing directory raises CheckpointError.
    """
    if not paths.tracker.is_file():
        return None
    text = paths.tracker.read_text(encoding="utf-8").strip()
    try:
        rollout_id = int(text)
    except ValueError:
        raise CheckpointError(
            f"{paths.tracker} should hold a rollout id, found {text[:40]!r}"
        ) from None
    target = checkpoint_dir(paths, rollout_id)
    if not target.is_dir():
        raise CheckpointError(
            f"{paths.tracker} points at rollout {rollout_id} but {target} is missing; the "
            "checkpoint directory was altered by hand (restore it or fix the tracker file)"
        )
    return rollout_id


def begin_checkpoint(paths: RunPaths, rollout_id: int) -> Path:
    """Create and return an empty temp dir beside `iter_{rollout_id:07d}` to write a save into."""
    final = checkpoint_dir(paths, rollout_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{final.name}{TMP_MARK}"))


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def commit_checkpoint(paths: RunPaths, rollout_id: int, tmp_dir: Path) -> Path:
    """Make the save in `tmp_dir` the checkpoint of `rollout_id`; return its final directory.

    Order: fsync every file -> rename tmp -> `iter_*` -> atomically rewrite the tracker LAST.
    An untracked `iter_*` left by an earlier crash (newer than the tracker) is replaced.
    """
    tmp_dir = Path(tmp_dir)
    final = checkpoint_dir(paths, rollout_id)
    if tmp_dir.parent != final.parent or not tmp_dir.name.startswith(final.name + TMP_MARK):
        raise ValueError(f"{tmp_dir} was not made by begin_checkpoint for rollout {rollout_id}")
    latest = latest_checkpoint(paths)
    if latest is not None and rollout_id <= latest:
        raise CheckpointError(
            f"cannot commit rollout {rollout_id}: rollout {latest} is already the latest complete "
            "checkpoint (saves must move forward)"
        )
    _fsync_tree(tmp_dir)
    stale: Path | None = None
    if final.exists():
        stale = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{final.name}{TMP_MARK}stale-"))
        os.rename(final, stale / final.name)
    os.rename(tmp_dir, final)
    fsync_dir(final.parent)
    write_text_atomic(paths.tracker, str(rollout_id))
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def cleanup_incomplete(paths: RunPaths) -> list[Path]:
    """Remove temp dirs left by interrupted saves (and torn temp files); return what was removed."""
    removed: list[Path] = []
    for parent in (paths.checkpoints, paths.rollout_state):
        if not parent.is_dir():
            continue
        for entry in sorted(parent.iterdir()):
            if TMP_MARK not in entry.name:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed
