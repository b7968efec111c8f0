"""The run's loopback Ray head started early (by `kimi-grpo run`, before the flow): the flow's
bring-up adopts it, a head nobody adopts is stopped, and a run with nothing left to do starts none.
Real Ray heads on loopback."""

from __future__ import annotations

from pathlib import Path

import psutil

from kimi_core.recipe import recipe_hash
from kimi_core.run_state import RunPaths
from kimi_core.runtime import local_head
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.manifest import Manifest
from kimi_core.runtime.ray_local import RayHead, is_alive, stop_local_ray_head

REPO = Path(__file__).resolve().parents[2]


def _ctx(base: Path, run: str) -> RunContext:
    return RunContext(recipe_path=str(REPO / "configs/local.yaml"), run_name=run, base_dir=str(base))


def _running(head: RayHead) -> bool:
    return psutil.pid_exists(head.pid) and psutil.Process(head.pid).status() != psutil.STATUS_ZOMBIE


def test_early_head_is_adopted_once_and_recorded(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, "early")
    assert local_head.start_early(ctx)
    paths = RunPaths.of(tmp_path, "early")
    head = local_head.adopt_early(paths.run_dir)
    try:
        assert head is not None and is_alive(head.address)
        record = Manifest.load(paths).stages[local_head.BRING_UP]
        assert record.status == "completed" and record.result is not None
        assert record.result["head"] == {**record.result["head"], "pid": head.pid, "address": head.address}
        assert Manifest.load(paths).ray_address == head.address
        assert local_head.adopt_early(paths.run_dir) is None  # adopted once; the next bring-up starts its own
        assert local_head.stop_unadopted() == []  # the adopted head keeps running
        assert _running(head)
    finally:
        if head is not None:
            stop_local_ray_head(head)
    assert not _running(head)


def test_unadopted_early_head_is_stopped_and_recorded_stopped(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, "unused")
    assert local_head.start_early(ctx)
    [head] = local_head.stop_unadopted()
    assert not _running(head)
    assert not Path(head.temp_dir).exists()  # it ran nothing: its Ray logs are removed with it
    manifest = Manifest.load(RunPaths.of(tmp_path, "unused"))
    record = manifest.stages[local_head.BRING_UP]
    assert record.status == "stopped" and manifest.ray_address is None
    starting = [r for r in manifest.stages.values() if r.status == "starting"]
    assert not starting


def test_no_early_head_for_a_finished_run_or_a_slurm_profile(tmp_path: Path) -> None:
    on_slurm = RunContext(recipe_path=str(REPO / "configs/local.yaml"), run_name="slurm", cluster="localhost-slurm",
                          base_dir=str(tmp_path))
    assert not local_head.start_early(on_slurm)
    assert not RunPaths.of(tmp_path, "slurm").manifest.exists()
    ctx = _ctx(tmp_path, "done")
    paths = RunPaths.of(tmp_path, "done")
    recipe = ctx.recipe()
    Manifest.load_or_create(paths.ensure(), recipe_hash=recipe_hash(recipe)).update(finished=True)
    assert not local_head.start_early(ctx)
    assert local_head.BRING_UP not in Manifest.load(paths).stages
