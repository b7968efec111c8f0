"""The run manifest: `{run}/manifest.json`, the run's bookkeeping (docs/design.md §4).

Stage records with their cache keys, the MLflow run id, Slurm job ids, the resume history and
recorded failures. Every mutation reloads under the run's lock, applies, and writes atomically,
so concurrent writers (the flow and a stage job) never lose each other's updates.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from kimi_core.atomic import write_text_atomic
from kimi_core.run_state import RunPaths


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


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
    #: The stage found its inputs unchanged and reused its earlier output.
    cached: bool = False
    finished_at: str


class AttemptRecord(BaseModel):
    """One launch of the run (attempt 0 is the first; each resume adds one)."""

    model_config = ConfigDict(extra="forbid")
    attempt: int
    started_at: str
    start_rollout_id: int | None = None
    reason: str
    slurm_job_ids: list[str] = Field(default_factory=list)
    #: Where the engine session ran (host, pid, Slurm job and node), when known.
    placement: dict[str, str] = Field(default_factory=dict)


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
    #: Every Slurm job of the run in submission order (stage jobs and Ray jobs), attempt or not.
    slurm_jobs: list[str] = Field(default_factory=list)
    #: The run's Ray-on-Slurm jobs in submission order (the last is the current one).
    ray_jobs: list[str] = Field(default_factory=list)
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
        self, name: str, *, cache_key: str, result: Any, status: str = "completed", cached: bool = False
    ) -> None:
        """Record a stage outcome; `result` must be JSON-serialisable and small."""
        record = StageRecord(status=status, cache_key=cache_key, result=result, cached=cached, finished_at=_now())

        def change(m: Manifest) -> None:
            m.stages = {**m.stages, name: record}

        self._mutate(change)

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

    def add_slurm_job_id(self, job_id: str, *, ray: bool = False) -> None:
        """Record a Slurm job of the run (idempotent): in `slurm_jobs`, in the current attempt if one
        has begun (stage jobs and the first Ray job come before the first attempt), and in `ray_jobs`
        when it is a Ray job."""

        def change(m: Manifest) -> None:
            if job_id not in m.slurm_jobs:
                m.slurm_jobs = [*m.slurm_jobs, job_id]
            if ray and job_id not in m.ray_jobs:
                m.ray_jobs = [*m.ray_jobs, job_id]
            if m.resume_history and job_id not in m.resume_history[-1].slurm_job_ids:
                m.resume_history[-1].slurm_job_ids.append(job_id)

        self._mutate(change)

    def record_placement(self, where: dict[str, str]) -> None:
        """Record where the current attempt's engine session runs."""

        def change(m: Manifest) -> None:
            self._current_attempt(m).placement = dict(where)

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

    @property
    def all_slurm_job_ids(self) -> list[str]:
        """Every Slurm job id of the run, each once, in the order first recorded."""
        ids = [*self.slurm_jobs, *(j for attempt in self.slurm_job_ids for j in attempt)]
        return list(dict.fromkeys(ids))
