"""Run state on the shared filesystem: one source of truth under `{base_dir}/runs/{run_name}/`.

Layout (DESIGN §4)::

    manifest.json                       stage records, MLflow run id, Slurm job ids, resume history
    checkpoints/iter_{rollout_id:07d}/  one complete checkpoint per saved rollout
    checkpoints/latest_checkpointed_iteration.txt   the last COMPLETE rollout id (written last)
    checkpoints/rollout/global_dataset_state_dict_{rollout_id}.pt   data position + RNG states
    data/  logs/
and `{base_dir}/mlflow.db` (default MLflow store shared by the runs under base_dir).

Plain POSIX paths, not fsspec: the protocol needs fcntl locks, fsync and atomic rename on a
shared filesystem, which object stores do not offer. Every file here is written atomically (temp file in the same directory, fsync, `os.replace`), so a
crash at any instant leaves either the old or the new content, never a torn one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
_TMP_MARK = ".tmp-"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


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
        return self.base_dir / "runs" / self.run_name

    @property
    def manifest(self) -> Path:
        return self.run_dir / "manifest.json"

    @property
    def lock(self) -> Path:
        return self.run_dir / ".manifest.lock"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tracker(self) -> Path:
        return self.checkpoints / TRACKER_FILENAME

    @property
    def rollout_state(self) -> Path:
        return self.checkpoints / "rollout"

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


# ----------------------------------------------------------------------------- atomic files
def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically: temp file beside it, fsync, `os.replace`, fsync dir."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{_TMP_MARK}")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """UTF-8 text variant of `write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- manifest
class StageRecord(BaseModel):
    """Outcome of one stage: `result` is small JSON (paths, ids, counts), never tensors."""

    model_config = ConfigDict(extra="forbid")
    status: str
    cache_key: str
    result: Any = None
    finished_at: str


class AttemptRecord(BaseModel):
    """One launch of the run (attempt 0 is the first; each resume adds one)."""

    model_config = ConfigDict(extra="forbid")
    attempt: int
    started_at: str
    start_rollout_id: int | None = None
    reason: str
    slurm_job_ids: list[str] = Field(default_factory=list)


class Manifest(BaseModel):
    """`manifest.json` of a run. Mutators reload under the lock, apply, and save atomically."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    version: int = 1
    run_name: str
    recipe_hash: str
    created_at: str
    stages: dict[str, StageRecord] = Field(default_factory=dict)
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    ray_address: str | None = None
    resume_history: list[AttemptRecord] = Field(default_factory=list)
    recipe_changes: list[dict[str, str]] = Field(default_factory=list)
    failures: list[dict[str, Any]] = Field(default_factory=list)
    finished: bool = False
    _paths: RunPaths | None = PrivateAttr(default=None)

    # ------------------------------------------------------------------ load / save
    @classmethod
    def load(cls, paths: RunPaths) -> Manifest:
        """Read an existing manifest; FileNotFoundError names the run when there is none."""
        if not paths.manifest.is_file():
            raise FileNotFoundError(
                f"run {paths.run_name!r} has no manifest at {paths.manifest}; was it ever started?"
            )
        manifest = cls._parse(paths)
        manifest._paths = paths
        return manifest

    @classmethod
    def _parse(cls, paths: RunPaths) -> Manifest:
        text = paths.manifest.read_text(encoding="utf-8")
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ValueError(f"{paths.manifest} is not a valid run manifest: {exc}") from exc

    @classmethod
    def load_or_create(
        cls, paths: RunPaths, *, recipe_hash: str, allow_recipe_change: bool = False
    ) -> Manifest:
        """Open the run's manifest, creating it (and the run dirs) for a new run.

        An existing run started with another recipe hash raises ValueError unless
        `allow_recipe_change`, in which case the change is recorded in `recipe_changes`.
        """
        paths.ensure()
        with _locked(paths.lock):
            if not paths.manifest.is_file():
                manifest = cls(run_name=paths.run_name, recipe_hash=recipe_hash, created_at=_now())
                manifest._write(paths)
            else:
                manifest = cls._parse(paths)
                if manifest.recipe_hash != recipe_hash:
                    if not allow_recipe_change:
                        raise ValueError(
                            f"run {paths.run_name!r} was started with recipe hash "
                            f"{manifest.recipe_hash} but this recipe hashes to {recipe_hash}; "
                            "resume it with the original recipe, choose a new run name, or allow "
                            "the recipe change explicitly"
                        )
                    manifest.recipe_changes.append(
                        {"from": manifest.recipe_hash, "to": recipe_hash, "at": _now()}
                    )
                    manifest.recipe_hash = recipe_hash
                    manifest._write(paths)
        manifest._paths = paths
        return manifest

    @property
    def paths(self) -> RunPaths:
        if self._paths is None:
            raise RuntimeError("manifest is not bound to a run directory; use Manifest.load*")
        return self._paths

    def _write(self, paths: RunPaths) -> None:
        write_text_atomic(paths.manifest, self.model_dump_json(indent=2) + "\n")

    def save(self) -> None:
        """Write this object as-is (atomically, under the run lock)."""
        with _locked(self.paths.lock):
            self._write(self.paths)

    def _mutate(self, change: Callable[[Manifest], None]) -> None:
        """Reload under the lock, apply `change`, write, and adopt the written state."""
        paths = self.paths
        with _locked(paths.lock):
            fresh = self._parse(paths) if paths.manifest.is_file() else self.model_copy(deep=True)
            change(fresh)
            fresh._write(paths)
        self.__dict__.update({name: getattr(fresh, name) for name in type(self).model_fields})

    def update(self, **fields: Any) -> None:
        """Set top-level fields by name (validated), e.g. `update(ray_address=None)`."""
        unknown = sorted(set(fields) - set(type(self).model_fields))
        if unknown:
            raise ValueError(
                f"unknown manifest field(s) {unknown}; valid: {sorted(type(self).model_fields)}"
            )

        def change(m: Manifest) -> None:
            for name, value in fields.items():
                setattr(m, name, value)

        self._mutate(change)

    # ------------------------------------------------------------------ stages
    def record_stage(
        self, name: str, *, cache_key: str, result: Any, status: str = "completed"
    ) -> None:
        """Record a stage outcome; `result` must be JSON-serialisable and small."""
        record = StageRecord(status=status, cache_key=cache_key, result=result, finished_at=_now())

        def change(m: Manifest) -> None:
            m.stages = {**m.stages, name: record}

        self._mutate(change)

    def stage_done(self, name: str, cache_key: str) -> Any | None:
        """The stored result when `name` completed with this `cache_key`, else None."""
        record = self.stages.get(name)
        if record is None or record.status != "completed" or record.cache_key != cache_key:
            return None
        return record.result

    # ------------------------------------------------------------------ attempts
    def begin_attempt(self, *, reason: str, start_rollout_id: int | None = None) -> int:
        """Append an attempt (0 for a fresh run, +1 per resume) and return its number."""

        def change(m: Manifest) -> None:
            number = len(m.resume_history)
            m.resume_history = [
                *m.resume_history,
                AttemptRecord(
                    attempt=number, started_at=_now(), reason=reason, start_rollout_id=start_rollout_id
                ),
            ]

        self._mutate(change)
        return self.resume_history[-1].attempt

    def _current_attempt(self, m: Manifest) -> AttemptRecord:
        if not m.resume_history:
            raise RuntimeError(f"run {m.run_name!r} has no attempt yet; call begin_attempt first")
        return m.resume_history[-1]

    def set_start_rollout(self, start_rollout_id: int) -> None:
        """Record where the current attempt started (known once the session loaded a checkpoint)."""

        def change(m: Manifest) -> None:
            self._current_attempt(m).start_rollout_id = start_rollout_id

        self._mutate(change)

    def add_slurm_job_id(self, job_id: str) -> None:
        """Append a Slurm job id to the current attempt (idempotent)."""

        def change(m: Manifest) -> None:
            attempt = self._current_attempt(m)
            if job_id not in attempt.slurm_job_ids:
                attempt.slurm_job_ids.append(job_id)

        self._mutate(change)

    def record_failure(self, *, stage: str, rollout_id: int | None, error: str) -> int:
        """Append a failure; return how many times this same failure (stage, rollout, error) is recorded."""
        entry = {"stage": stage, "rollout_id": rollout_id, "error": error[:500], "at": _now()}

        def change(m: Manifest) -> None:
            m.failures = [*m.failures, entry]

        self._mutate(change)
        same = ("stage", "rollout_id", "error")
        return sum(all(f.get(k) == entry[k] for k in same) for f in self.failures)

    @property
    def slurm_job_ids(self) -> list[list[str]]:
        """Slurm job ids per attempt (index = attempt number)."""
        return [list(a.slurm_job_ids) for a in self.resume_history]


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
    `write_bytes_atomic` BEFORE `commit_checkpoint` so the tracker never points past it."""
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
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{final.name}{_TMP_MARK}"))


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
    if tmp_dir.parent != final.parent or not tmp_dir.name.startswith(final.name + _TMP_MARK):
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
        stale = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{final.name}{_TMP_MARK}stale-"))
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
            if _TMP_MARK not in entry.name:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


# ----------------------------------------------------------------------------- schedule
def _check_rollout(rollout_id: int) -> None:
    if rollout_id < 0:
        raise ValueError(f"rollout_id must be >= 0, got {rollout_id}")


def is_save_due(rollout_id: int, *, save_interval: int | None, num_rollout: int) -> bool:
    """Save after `rollout_id` when `(rollout_id + 1) % save_interval == 0` or it is the final
    rollout (`num_rollout - 1`; `num_rollout` is the absolute end id). `save_interval=None`:
    only the final save."""
    _check_rollout(rollout_id)
    if save_interval is not None and save_interval <= 0:
        raise ValueError(f"save_interval must be a positive integer or None, got {save_interval}")
    if rollout_id == num_rollout - 1:
        return True
    return save_interval is not None and (rollout_id + 1) % save_interval == 0


def is_eval_due(rollout_id: int, *, eval_interval: int | None) -> bool:
    """Evaluate after the weight push of `rollout_id` when `(rollout_id + 1) % eval_interval == 0`;
    `eval_interval=None` disables periodic eval."""
    _check_rollout(rollout_id)
    if eval_interval is None:
        return False
    if eval_interval <= 0:
        raise ValueError(f"eval_interval must be a positive integer or None, got {eval_interval}")
    return (rollout_id + 1) % eval_interval == 0


def eval_before_train(start_rollout_id: int, *, enabled: bool) -> bool:
    """Evaluate the initial weights only when a run starts at rollout 0 (never on resume)."""
    _check_rollout(start_rollout_id)
    return enabled and start_rollout_id == 0
