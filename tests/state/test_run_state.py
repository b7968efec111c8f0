"""Run state: atomic manifest, checkpoint commit protocol (incl. a SIGKILLed save)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kimi_core import atomic, run_state
from kimi_core.atomic import write_bytes_atomic
from kimi_core.run_state import (
    CheckpointError,
    RunPaths,
    begin_checkpoint,
    checkpoint_dir,
    cleanup_incomplete,
    commit_checkpoint,
    dataset_state_path,
    latest_checkpoint,
)
from kimi_core.runtime.manifest import Manifest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def paths(tmp_path: Path) -> RunPaths:
    return RunPaths.of(tmp_path, "run-a").ensure()


def _save(paths: RunPaths, rollout_id: int, payload: str) -> Path:
    tmp = begin_checkpoint(paths, rollout_id)
    (tmp / "model.bin").write_text(payload)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "shard.bin").write_text(payload * 2)
    return commit_checkpoint(paths, rollout_id, tmp)


# ----------------------------------------------------------------------------- paths / manifest
def test_run_paths_layout(tmp_path: Path) -> None:
    paths = RunPaths.of(tmp_path, "my_run.1")
    assert paths.run_dir == tmp_path.resolve() / "runs" / "my_run.1"
    assert paths.manifest.name == "manifest.json"
    assert paths.mlflow_db == tmp_path.resolve() / "mlflow.db"
    assert paths.tracker == paths.run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    assert paths.slurm == paths.run_dir / "slurm"
    assert str(paths.checkpoints) == run_state.run_path(str(tmp_path.resolve()), "my_run.1", "checkpoints")
    assert run_state.run_path("<base_dir>", "<run_name>", "slurm") == "<base_dir>/runs/<run_name>/slurm"
    assert checkpoint_dir(paths, 19).name == "iter_0000019"
    assert dataset_state_path(paths, 19) == (
        paths.run_dir / "checkpoints" / "rollout" / "global_dataset_state_dict_19.pt"
    )
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="run_name"):
            RunPaths.of(tmp_path, bad)


def test_manifest_create_record_reload(paths: RunPaths) -> None:
    manifest = Manifest.load_or_create(paths, recipe_hash="h1")
    assert "prepare_data" not in manifest.stages
    manifest.record_stage("prepare_data", cache_key="k1", result={"rows": 17, "sha256": "ab"}, cached=True)
    manifest.update(mlflow_run_id="r123", mlflow_tracking_uri="sqlite:////x/mlflow.db")
    assert manifest.begin_attempt(reason="fresh") == 0
    manifest.add_slurm_job_id("100")
    manifest.add_slurm_job_id("100")
    manifest.set_start_rollout(0)

    reloaded = Manifest.load_or_create(paths, recipe_hash="h1")
    record = reloaded.stages["prepare_data"]
    assert (record.status, record.cache_key, record.cached) == ("completed", "k1", True)
    assert record.result == {"rows": 17, "sha256": "ab"}
    assert reloaded.mlflow_run_id == "r123"
    assert reloaded.begin_attempt(reason="resume after node failure") == 1
    reloaded.add_slurm_job_id("101")
    reloaded.set_start_rollout(20)

    on_disk = json.loads(paths.manifest.read_text())
    assert on_disk["recipe_hash"] == "h1"
    assert [a["slurm_job_ids"] for a in on_disk["resume_history"]] == [["100"], ["101"]]
    assert [a["start_rollout_id"] for a in on_disk["resume_history"]] == [0, 20]
    assert on_disk["resume_history"][1]["reason"] == "resume after node failure"
    assert Manifest.load(paths).slurm_job_ids == [["100"], ["101"]]


def test_recipe_hash_mismatch(paths: RunPaths) -> None:
    Manifest.load_or_create(paths, recipe_hash="h1")
    with pytest.raises(ValueError, match="started with recipe hash h1.*hashes to h2"):
        Manifest.load_or_create(paths, recipe_hash="h2")
    changed = Manifest.load_or_create(paths, recipe_hash="h2", allow_recipe_change=True)
    assert changed.recipe_hash == "h2"
    assert changed.recipe_changes[0]["from"] == "h1"
    assert Manifest.load(paths).recipe_hash == "h2"


def test_two_handles_do_not_lose_updates(paths: RunPaths) -> None:
    """Mutators reload under the lock, so two handles on the same run merge their changes."""
    first = Manifest.load_or_create(paths, recipe_hash="h")
    second = Manifest.load(paths)
    first.record_stage("a", cache_key="1", result=1)
    second.record_stage("b", cache_key="2", result=2)
    merged = Manifest.load(paths)
    assert merged.stages["a"].result == 1 and merged.stages["b"].result == 2


def test_manifest_update_rejects_unknown_field(paths: RunPaths) -> None:
    manifest = Manifest.load_or_create(paths, recipe_hash="h")
    with pytest.raises(ValueError, match="unknown manifest field.*'ray_adress'"):
        manifest.update(ray_adress="x")


def test_manifest_write_is_atomic_on_failure(paths: RunPaths, monkeypatch) -> None:
    """A crash between writing the temp file and the rename keeps the old manifest intact."""
    manifest = Manifest.load_or_create(paths, recipe_hash="h")
    before = paths.manifest.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        manifest.record_stage("x", cache_key="k", result=1)
    assert paths.manifest.read_bytes() == before
    assert sorted(p.name for p in paths.run_dir.iterdir() if p.name.startswith(".manifest.json")) == []


def test_missing_and_corrupt_manifest(tmp_path: Path) -> None:
    paths = RunPaths.of(tmp_path, "nope")
    with pytest.raises(FileNotFoundError, match="'nope' has no manifest"):
        Manifest.load(paths)
    paths.ensure()
    paths.manifest.write_text('{"run_name": 3}')
    with pytest.raises(ValueError, match="not a valid run manifest"):
        Manifest.load(paths)


# ----------------------------------------------------------------------------- checkpoints
def test_commit_protocol(paths: RunPaths) -> None:
    assert latest_checkpoint(paths) is None
    final = _save(paths, 4, "four")
    assert final == checkpoint_dir(paths, 4)
    assert (final / "sub" / "shard.bin").read_text() == "fourfour"
    assert paths.tracker.read_text() == "4"
    assert latest_checkpoint(paths) == 4
    _save(paths, 9, "nine")
    assert latest_checkpoint(paths) == 9
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == [
        "iter_0000004",
        "iter_0000009",
        "latest_checkpointed_iteration.txt",
        "rollout",
    ]
    with pytest.raises(CheckpointError, match="already the latest"):
        _save(paths, 9, "again")


def test_failure_before_commit_keeps_previous_latest(paths: RunPaths) -> None:
    _save(paths, 0, "zero")
    tmp = begin_checkpoint(paths, 1)
    (tmp / "model.bin").write_text("partial")
    # the save "fails" here: commit_checkpoint is never called
    assert latest_checkpoint(paths) == 0
    assert not checkpoint_dir(paths, 1).exists()
    assert cleanup_incomplete(paths) == [tmp]
    assert not tmp.exists()
    _save(paths, 1, "one")
    assert latest_checkpoint(paths) == 1


def test_crash_between_rename_and_tracker(paths: RunPaths, monkeypatch) -> None:
    """iter_1 renamed into place but the tracker not updated: 0 stays latest; a re-save of 1
    replaces the untracked directory."""
    _save(paths, 0, "zero")

    def crash(path, text):
        raise OSError("simulated crash before the tracker update")

    with monkeypatch.context() as patch:
        patch.setattr(run_state, "write_text_atomic", crash)
        with pytest.raises(OSError, match="simulated"):
            _save(paths, 1, "stale")
    assert checkpoint_dir(paths, 1).is_dir()
    assert latest_checkpoint(paths) == 0
    _save(paths, 1, "fresh")
    assert latest_checkpoint(paths) == 1
    assert (checkpoint_dir(paths, 1) / "model.bin").read_text() == "fresh"
    assert [p.name for p in paths.checkpoints.iterdir() if ".tmp-" in p.name] == []


def test_tracker_pointing_at_missing_dir(paths: RunPaths) -> None:
    _save(paths, 3, "three")
    checkpoint_dir(paths, 3).rename(paths.checkpoints / "moved")
    with pytest.raises(CheckpointError, match="points at rollout 3 but .*iter_0000003 is missing"):
        latest_checkpoint(paths)
    paths.tracker.write_text("release")
    with pytest.raises(CheckpointError, match="should hold a rollout id"):
        latest_checkpoint(paths)


def test_commit_rejects_foreign_dir(paths: RunPaths, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not made by begin_checkpoint"):
        commit_checkpoint(paths, 2, tmp_path)
    tmp = begin_checkpoint(paths, 2)
    with pytest.raises(ValueError, match="not made by begin_checkpoint for rollout 3"):
        commit_checkpoint(paths, 3, tmp)


_SAVER = textwrap.dedent(
    """
    import sys, time
    from kimi_core.atomic import write_bytes_atomic
    from kimi_core.run_state import RunPaths, begin_checkpoint, commit_checkpoint
    from kimi_core.run_state import dataset_state_path
    paths = RunPaths.of(sys.argv[1], "run-a").ensure()
    tmp = begin_checkpoint(paths, 0)
    (tmp / "model.bin").write_bytes(b"complete")
    write_bytes_atomic(dataset_state_path(paths, 0), b"state-0")
    commit_checkpoint(paths, 0, tmp)
    tmp = begin_checkpoint(paths, 1)
    with open(tmp / "model.bin", "wb") as handle:
        handle.write(b"half of the weights")
        handle.flush()
        print("SAVING", flush=True)
        time.sleep(120)
    """
)


def test_sigkill_mid_save(paths: RunPaths) -> None:
    """A process SIGKILLed while writing rollout 1 leaves rollout 0 as the latest checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(paths.base_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "SAVING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(paths) == 0
    assert (checkpoint_dir(paths, 0) / "model.bin").read_bytes() == b"complete"
    assert dataset_state_path(paths, 0).read_bytes() == b"state-0"
    leftovers = [p for p in paths.checkpoints.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and leftovers[0].name.startswith("iter_0000001")
    assert cleanup_incomplete(paths) == leftovers
    assert [p for p in paths.checkpoints.iterdir() if ".tmp-" in p.name] == []
    assert latest_checkpoint(paths) == 0


def test_write_bytes_atomic_replaces(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "f.bin"
    write_bytes_atomic(target, b"one")
    write_bytes_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]
