"""MilesEngine against the named double of miles @31f1ca961 (`fake_miles.py`).

Contract: the calls our engine makes, driven by the real `RolloutLoop`, equal a hand-written trace
of what miles' train.py @31f1ca961 calls for the same schedule, up to the deviations listed in
`kimi_core/engines/miles/engine.py` (each applied below by name). Then resume, checkpoint
reconcile, failures and the import hygiene of the GPU engine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kimi_core.engines import engine_unavailable, make_engine
from kimi_core.engines.base import Engine, EngineBroken, EngineInputs, TrackingTarget
from kimi_core.engines.miles import MILES_COMMIT
from kimi_core.engines.miles.api import API_ENV, load_miles_api
from kimi_core.engines.miles.args import check_argv, miles_argv, render_argv
from kimi_core.engines.miles.checkpoints import UNTRACKED_DIR, reconcile_checkpoints
from kimi_core.engines.miles.engine import MilesEngine, PhaseTimeouts, StartMismatch, State
from kimi_core.recipe import Recipe, load_recipe, plan_run
from kimi_core.run_state import CheckpointError, RunPaths, latest_checkpoint
from kimi_core.runtime.failures import is_transient
from kimi_core.runtime.loop import RolloutLoop, StopRequest
from kimi_core.runtime.recording import MemoryRecorder
from tests.engines import fake_miles
from tests.engines.fake_miles import CUDA_GRAPH, KV_CACHE, WEIGHTS, FakeMiles

REPO = Path(__file__).resolve().parents[2]
GPU_RECIPE = REPO / "configs" / "kimi-k25-grpo.yaml"
GOLDEN = REPO / "tests" / "golden" / "miles-engine"
FAKE = "tests.engines.fake_miles:make_api"
# 6 rollouts, save every 2, eval every 3: saves after 1, 3, 5; evals before 0 and after 2, 5.
SMALL = ["rollout.num_rollout=6", "checkpoint.save_interval=2", "eval.interval=3"]


def gpu_recipe(base_dir: Path, *overrides: str) -> Recipe:
    return load_recipe(GPU_RECIPE, base_dir=str(base_dir), overrides=[*SMALL, *overrides])


def inputs(base: Path) -> EngineInputs:
    return EngineInputs(train_data=str(base / "data/train.jsonl"), eval_data={"aime": str(base / "data/eval-aime.jsonl")},
                        initial_checkpoint=str(base / "Kimi-K2.5-int4"), reference_checkpoint=str(base / "Kimi-K2.5-bf16"))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    double = FakeMiles()
    monkeypatch.setattr(fake_miles, "CURRENT", double)
    monkeypatch.setenv(API_ENV, FAKE)
    yield double
    double.release()


@pytest.fixture
def run(tmp_path: Path, fake: FakeMiles):
    """`run(*overrides, extra=(), timeouts=...) -> (engine, recipe, paths)` (the engine not started)."""
    engines: list[MilesEngine] = []

    def build(*overrides: str, extra: tuple[str, ...] = (), timeouts: PhaseTimeouts | None = None):
        recipe = gpu_recipe(tmp_path, *overrides)
        paths = RunPaths.of(tmp_path, "run").ensure()
        engine = MilesEngine(recipe, paths=paths, inputs=inputs(tmp_path), timeouts=timeouts or PhaseTimeouts(),
                             extra_args=extra)
        engines.append(engine)
        return engine, recipe, paths

    yield build
    fake.release()
    for engine in engines:
        engine.close()


def drive(engine: MilesEngine, recipe: Recipe, paths: RunPaths, *, stop_after: int | None = None,
          logged_evals: frozenset[int] = frozenset()) -> list[Any]:
    """The real `RolloutLoop` over the engine, then close; `stop_after`: a stop request after that rollout."""
    plan = plan_run(recipe)
    start = engine.start(latest_checkpoint(paths))
    stop = StopRequest()
    loop = RolloutLoop(session=engine, plan=plan, recorder=MemoryRecorder(), start=start, stop=stop,
                       pending_evals=RolloutLoop.evals_owed(plan, start=start, logged_evals=set(logged_evals)),
                       logged_evals=set(logged_evals))
    results: list[Any] = []
    for step in loop.steps():
        if step.kind == "train":
            results.append(loop.train(step.rollout_id))
            if step.rollout_id == stop_after:
                stop.request("SIGUSR1")
        else:
            results.append(loop.evaluate(step.rollout_id))
    engine.close()
    return results


# ---- the hand-written trace of train.py @31f1ca961 -------------------------------------------
def periodic(rollout_id: int, interval: int | None, num_rollout: int | None = None) -> bool:
    """miles/utils/misc.py::should_run_periodic_action with num_rollout_per_epoch None."""
    if interval is None:
        return False
    if num_rollout is not None and rollout_id == num_rollout - 1:
        return True
    return (rollout_id + 1) % interval == 0


def train_py(*, start: int, num_rollout: int, save_interval: int | None, eval_interval: int | None,
             skip_eval_before_train: bool, colocate: bool = True, level: tuple[str, ...] = ("kv_cache", "weight"),
             sentinel_at: int | None = None, exit_after: int | None = None) -> list[tuple[Any, ...]]:
    """What train.py @31f1ca961 calls, in order (with --colocate: offload_train = offload_rollout = True)."""
    offload = colocate
    t: list[tuple[Any, ...]] = [("parse_args",), ("configure_logger", "main"), ("create_placement_groups",),
                                ("object_store_init", False), ("init_tracking",),
                                ("create_rollout_manager", "pg-rollout"), ("create_training_models",)]
    if offload:
        t.append(("rm.onload_weights",))
    t.append(("actor.update_weights", None))
    if offload:
        t.append(("rm.onload_kv",))
    for i in range(start, num_rollout):
        if eval_interval is not None and i == start and not skip_eval_before_train:
            t.append(("rm.eval", i))
        t.append(("rm.generate", i))
        if offload:
            tags = [CUDA_GRAPH] + ([KV_CACHE] if "kv_cache" in level else []) + ([WEIGHTS] if "weight" in level else [])
            t.append(("rm.offload", tuple(tags)))
        t += [("actor.train", i), ("remove_rollout_data_refs", i)]
        external = sentinel_at == i
        if external or periodic(i, save_interval, num_rollout):
            t += [("actor.save_model", i, external or i == num_rollout - 1), ("rm.save", i)]
        t.append(("actor.offload",) if offload else ("actor.clear_memory",))
        if offload:
            t.append(("rm.onload_weights",))
        t.append(("actor.update_weights", i))
        if offload:
            t.append(("rm.onload_kv",))
        if periodic(i, eval_interval):
            t.append(("rm.eval", i))
        if exit_after is not None and i - start + 1 >= exit_after:
            break
    t.append(("rm.dispose",))
    return t


def deviation_1_no_primary_tracking(trace: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The flow owns the MLflow run: no init_tracking in the engine."""
    return [call for call in trace if call != ("init_tracking",)]


def deviation_3_final_save(trace: list[tuple[Any, ...]], final: int) -> list[tuple[Any, ...]]:
    """Without a save interval the loop still saves after the final rollout (train.py never saves)."""
    at = trace.index(("remove_rollout_data_refs", final)) + 1
    return trace[:at] + [("actor.save_model", final, True), ("rm.save", final)] + trace[at:]


def deviation_4_eval_before_train(trace: list[tuple[Any, ...]], start: int) -> list[tuple[Any, ...]]:
    """Without an eval interval the loop still evaluates before training (eval.before_train)."""
    at = trace.index(("rm.generate", start))
    return trace[:at] + [("rm.eval", start)] + trace[at:]


def test_the_pin_is_a_full_commit_hash() -> None:
    assert len(MILES_COMMIT) == 40 and MILES_COMMIT.startswith("31f1ca961")


def test_contract_fresh_run(run, fake: FakeMiles) -> None:
    engine, recipe, paths = run()
    results = drive(engine, recipe, paths)
    expected = train_py(start=0, num_rollout=6, save_interval=2, eval_interval=3, skip_eval_before_train=False)
    assert fake.trace() == deviation_1_no_primary_tracking(expected)
    saved = [r.checkpoint for r in results if getattr(r, "checkpoint", None)]
    assert saved == [str(paths.checkpoints / f"iter_{i:07d}") for i in (1, 3, 5)]
    assert latest_checkpoint(paths) == 5
    assert "--skip-eval-before-train" not in fake.args.argv


def test_contract_resume_at_3(run, fake: FakeMiles) -> None:
    engine, recipe, paths = run()
    write_checkpoint(paths, 2)
    drive(engine, recipe, paths, logged_evals=frozenset({2}))
    expected = train_py(start=3, num_rollout=6, save_interval=2, eval_interval=3, skip_eval_before_train=True)
    assert fake.trace() == deviation_1_no_primary_tracking(expected)
    assert "--skip-eval-before-train" in fake.args.argv


def test_contract_resume_replays_an_owed_eval(run, fake: FakeMiles) -> None:
    engine, recipe, paths = run()
    write_checkpoint(paths, 2)
    drive(engine, recipe, paths)  # the eval after rollout 2 was never logged (deviation 4)
    expected = deviation_1_no_primary_tracking(
        train_py(start=3, num_rollout=6, save_interval=2, eval_interval=3, skip_eval_before_train=True))
    at = expected.index(("rm.generate", 3))
    assert fake.trace() == expected[:at] + [("rm.eval", 2)] + expected[at:]


def test_contract_no_save_interval(run, fake: FakeMiles) -> None:
    engine, recipe, paths = run("checkpoint.save_interval=null")
    drive(engine, recipe, paths)
    expected = train_py(start=0, num_rollout=6, save_interval=None, eval_interval=3, skip_eval_before_train=False)
    assert fake.trace() == deviation_3_final_save(deviation_1_no_primary_tracking(expected), 5)


def test_contract_no_eval_interval(run, fake: FakeMiles) -> None:
    engine, recipe, paths = run("eval.interval=null")
    drive(engine, recipe, paths)
    expected = train_py(start=0, num_rollout=6, save_interval=2, eval_interval=None, skip_eval_before_train=False)
    assert fake.trace() == deviation_4_eval_before_train(deviation_1_no_primary_tracking(expected), 0)


def test_contract_requested_save(run, fake: FakeMiles) -> None:
    engine, recipe, paths = run("checkpoint.save_interval=4")
    results = drive(engine, recipe, paths, stop_after=1)  # rollout 1 unsaved -> rollout 2 saves, then stop
    expected = train_py(start=0, num_rollout=6, save_interval=4, eval_interval=3, skip_eval_before_train=False,
                        sentinel_at=2, exit_after=3)
    assert fake.trace() == deviation_1_no_primary_tracking(expected)
    assert results[-2].checkpoint == str(paths.checkpoints / "iter_0000002") and latest_checkpoint(paths) == 2


def test_contract_kv_cache_only_offload(run, fake: FakeMiles) -> None:
    engine, recipe, paths = run(extra=("--offload-rollout-level", "kv_cache"))
    drive(engine, recipe, paths)
    expected = train_py(start=0, num_rollout=6, save_interval=2, eval_interval=3, skip_eval_before_train=False,
                        level=("kv_cache",))
    assert fake.trace() == deviation_1_no_primary_tracking(expected)
    assert ("rm.offload", (CUDA_GRAPH, KV_CACHE)) in fake.trace()


def test_contract_not_colocated(run, fake: FakeMiles) -> None:
    engine, recipe, paths = run("parallel.colocate=false")
    drive(engine, recipe, paths)
    expected = train_py(start=0, num_rollout=6, save_interval=2, eval_interval=3, skip_eval_before_train=False,
                        colocate=False)
    assert fake.trace() == deviation_1_no_primary_tracking(expected)


# ---- resume and checkpoint reconcile ---------------------------------------------------------
def write_checkpoint(paths: RunPaths, rollout_id: int, *, data: bool = True, track: bool = True) -> None:
    """A checkpoint as miles writes it: iter dir + tracker (save_model), then the data position (rm.save)."""
    (paths.checkpoints / f"iter_{rollout_id:07d}").mkdir(parents=True)
    (paths.checkpoints / f"iter_{rollout_id:07d}" / "common.pt").write_bytes(b"w")
    if track:
        paths.tracker.write_text(str(rollout_id))
    if data:
        paths.rollout_state.mkdir(parents=True, exist_ok=True)
        (paths.rollout_state / f"global_dataset_state_dict_{rollout_id}.pt").write_bytes(f"pos-{rollout_id}".encode())


def test_resume_start_ids_and_data_position(run, fake: FakeMiles) -> None:
    engine, _recipe, paths = run()
    write_checkpoint(paths, 2)
    assert engine.start(2) == 3
    assert fake.args.start_rollout_id == 3 and fake.loaded_position == b"pos-2"


def test_fresh_start_is_rollout_0(run, fake: FakeMiles) -> None:
    engine, _recipe, _paths = run()
    assert engine.start(None) == 0 and engine.state is State.READY


def test_stale_iteration_is_moved_aside(run, fake: FakeMiles) -> None:
    engine, _recipe, paths = run()
    write_checkpoint(paths, 2)
    write_checkpoint(paths, 4, track=False)  # a save whose tracker never moved
    assert engine.start(2) == 3
    assert not (paths.checkpoints / "iter_0000004").exists()
    assert [p.name.split(".")[0] for p in (paths.checkpoints / UNTRACKED_DIR).iterdir()] == ["iter_0000004"]


def test_missing_data_position_rewinds_the_tracker(run, fake: FakeMiles) -> None:
    engine, _recipe, paths = run()
    write_checkpoint(paths, 2)
    write_checkpoint(paths, 4, data=False)  # crashed between save_model and rm.save
    assert engine.start(4) == 3
    assert paths.tracker.read_text() == "2" and fake.loaded_position == b"pos-2"
    assert not (paths.checkpoints / "iter_0000004").exists()


def test_missing_data_position_without_an_older_checkpoint_fails(run, fake: FakeMiles) -> None:
    engine, _recipe, paths = run()
    write_checkpoint(paths, 4, data=False)
    with pytest.raises(CheckpointError, match="no older checkpoint is complete"):
        engine.start(4)
    assert engine.state is State.BROKEN and fake.calls == []  # miles was never brought up


def test_reconcile_on_real_files(tmp_path: Path) -> None:
    paths = RunPaths.of(tmp_path, "r").ensure()
    assert reconcile_checkpoints(paths).start == 0
    write_checkpoint(paths, 1)
    write_checkpoint(paths, 3)
    write_checkpoint(paths, 5, data=False)
    write_checkpoint(paths, 7, track=False)
    fixed = reconcile_checkpoints(paths)
    assert (fixed.tracked, fixed.latest, fixed.start, fixed.rewound) == (5, 3, 4, True)
    assert sorted(p.name.split(".")[0] for p in fixed.moved_aside) == ["iter_0000005", "iter_0000007"]
    assert latest_checkpoint(paths) == 3
    again = reconcile_checkpoints(paths)
    assert (again.latest, again.moved_aside, again.rewound) == (3, (), False)


def test_miles_starting_elsewhere_is_permanent(run, fake: FakeMiles) -> None:
    engine, _recipe, _paths = run()
    fake.start_override = 7
    with pytest.raises(StartMismatch, match="miles starts at rollout 7"):
        engine.start(None)
    assert engine.state is State.BROKEN and not is_transient(StartMismatch("x"))


def test_a_resume_point_other_than_the_tracker_is_refused(run, fake: FakeMiles) -> None:
    engine, _recipe, paths = run()
    write_checkpoint(paths, 2)
    with pytest.raises(CheckpointError, match="asked to resume from 1"):
        engine.start(1)


# ---- failures --------------------------------------------------------------------------------
def test_generate_failure_leaves_ready_and_retries_in_the_same_engine(run, fake: FakeMiles) -> None:
    engine, _recipe, _paths = run()
    engine.start(None)
    fake.fail("rm.generate", "raise")
    with pytest.raises(fake_miles.FakeMilesError):
        engine.train_rollout(0, save=False, force_sync=False)
    assert engine.state is State.READY
    result = engine.train_rollout(0, save=False, force_sync=False)
    assert result.rollout_id == 0 and result.checkpoint is None
    assert set(result.metrics) == {"perf/driver/generate_time", "perf/driver/train_time",
                                   "perf/driver/update_weights_time"}
    assert fake.calls.count(("parse_args",)) == 1 and fake.calls.count(("rm.generate", 0)) == 2


def test_eval_failure_leaves_ready(run, fake: FakeMiles) -> None:
    engine, _recipe, _paths = run()
    engine.start(None)
    fake.fail("rm.eval", "raise")
    with pytest.raises(fake_miles.FakeMilesError):
        engine.evaluate(0)
    assert engine.state is State.READY
    assert engine.evaluate(0).metrics == {}  # miles logs eval/* to MLflow; read-back is a later step


@pytest.mark.parametrize("where", ["actor.train", "actor.save_model", "rm.save", "actor.update_weights", "rm.onload_kv"])
def test_a_failure_after_generate_breaks_the_engine(run, fake: FakeMiles, where: str) -> None:
    engine, _recipe, _paths = run()
    engine.start(None)
    fake.fail(where, "raise")
    with pytest.raises(EngineBroken, match="broken"):
        engine.train_rollout(0, save=True, force_sync=False)
    assert engine.state is State.BROKEN
    for call in (lambda: engine.train_rollout(0, save=False, force_sync=False), lambda: engine.evaluate(0),
                 lambda: engine.start(None)):
        with pytest.raises(EngineBroken):
            call()


@pytest.mark.parametrize("where", ["rm.generate", "rm.eval"])
def test_an_actor_death_breaks_the_engine_even_in_generate_or_eval(run, fake: FakeMiles, where: str) -> None:
    engine, _recipe, _paths = run()
    engine.start(None)
    fake.fail(where, "die")
    with pytest.raises(EngineBroken, match="FakeActorDied"):
        engine.evaluate(0) if where == "rm.eval" else engine.train_rollout(0, save=False, force_sync=False)
    assert engine.state is State.BROKEN


@pytest.mark.parametrize("where", ["rm.generate", "actor.train"])
def test_a_hang_times_out_and_breaks_the_engine(run, fake: FakeMiles, where: str) -> None:
    engine, _recipe, _paths = run(timeouts=PhaseTimeouts(generate=0.3, train=0.3))
    engine.start(None)
    fake.fail(where, "hang")
    with pytest.raises(EngineBroken, match="PhaseTimeout"):
        engine.train_rollout(0, save=False, force_sync=False)
    assert engine.state is State.BROKEN


def test_a_bring_up_failure_breaks_the_engine(run, fake: FakeMiles) -> None:
    engine, _recipe, _paths = run()
    fake.fail("create_rollout_manager", "raise")
    with pytest.raises(EngineBroken, match="bring-up"):
        engine.start(None)
    with pytest.raises(EngineBroken):
        engine.start(None)


def test_miles_rejecting_its_argv_is_a_permanent_error_not_an_exit(run, fake: FakeMiles) -> None:
    engine, _recipe, _paths = run()
    fake.fail("parse_args", "exit")
    with pytest.raises(ValueError, match="miles rejected its arguments"):
        engine.start(None)
    assert engine.state is State.BROKEN


def test_miles_is_brought_up_once_per_process(run, fake: FakeMiles) -> None:
    first, _recipe, _paths = run()
    first.start(None)
    second, _recipe, _paths = run()
    with pytest.raises(EngineBroken, match="already brought up in this process"):
        second.start(None)


def test_the_runtime_never_retries_a_broken_engine_in_place() -> None:
    assert not is_transient(EngineBroken("x"))  # EngineSession re-raises it as SessionLost: a new session


def test_a_saved_rollout_reports_its_committed_checkpoint_and_metrics(run, fake: FakeMiles) -> None:
    engine, _recipe, paths = run()
    engine.start(None)
    engine.train_rollout(0, save=False, force_sync=False)
    result = engine.train_rollout(1, save=True, force_sync=True)
    assert result.checkpoint == str(paths.checkpoints / "iter_0000001") and latest_checkpoint(paths) == 1
    assert ("actor.save_model", 1, True) in fake.calls
    saved = json.loads((paths.checkpoints / "iter_0000001" / "rollout_metrics.json").read_text())
    assert sorted(saved) == ["0", "1"] and "perf/driver/save_time" in saved["1"]


# ---- the argv, selection and imports ---------------------------------------------------------
def golden_argv(start: int = 0, extra: tuple[str, ...] = ()) -> list[str]:
    recipe = load_recipe(GPU_RECIPE, base_dir="/shared")
    paths = RunPaths.of("/shared", "kimi-k25-grpo")
    return miles_argv(recipe, paths=paths, prompt_data="/shared/runs/kimi-k25-grpo/data/train.jsonl",
                      eval_data={"aime": "/shared/runs/kimi-k25-grpo/data/eval-aime.jsonl"},
                      hf_checkpoint="/shared/Kimi-K2.5-int4", ref_load="/shared/Kimi-K2.5-bf16",
                      tracking=TrackingTarget("http://mlflow.internal:5000", "kimi-k25-grpo", "0123456789abcdef"),
                      start=start, extra=extra)


def test_miles_argv_matches_golden() -> None:
    assert render_argv(golden_argv()) == (GOLDEN / "kimi-k25-grpo.txt").read_text()


def smoke_argv() -> list[str]:
    recipe = load_recipe(REPO / "configs" / "kimi-k25-2layer-smoke.yaml", base_dir="/shared")
    run = "kimi-k25-2layer-smoke"
    paths = RunPaths.of("/shared", run)
    return miles_argv(recipe, paths=paths, prompt_data=f"/shared/runs/{run}/data/train.jsonl",
                      eval_data={d.name: f"/shared/runs/{run}/data/eval-{d.name}.jsonl" for d in recipe.eval.datasets},
                      hf_checkpoint="/shared/Kimi-K2.5-2layer", ref_load="/shared/Kimi-K2.5-2layer_torch_dist",
                      tracking=TrackingTarget("http://mlflow.internal:5000", "kimi-k25-grpo", "0123456789abcdef"),
                      start=0)


def test_miles_argv_of_the_smoke_recipe_matches_golden() -> None:
    """The 2-layer smoke recipe (miles' own 2-layer K2.5 CI shape); to accept an intended change,
    regenerate the file with `render_argv(smoke_argv())`."""
    assert render_argv(smoke_argv()) == (GOLDEN / "kimi-k25-2layer-smoke.txt").read_text()


def test_miles_argv_on_resume_skips_the_eval_before_training() -> None:
    resumed = golden_argv(3)
    assert resumed.count("--skip-eval-before-train") == 1 and "--skip-eval-before-train" not in golden_argv(0)
    assert [token for token in resumed if token != "--skip-eval-before-train"] == golden_argv(0)


@pytest.mark.parametrize("extra, flag", [
    (("--fully-async",), "--fully-async"), (("--start-rollout-id", "4"), "--start-rollout-id"),
    (("--control-server-port", "9000"), "--control-server-port"), (("--use-wandb",), None),
    (("--save-trigger-sentinel", "/x"), "--save-trigger-sentinel"), (("--load", "/elsewhere"), "--load"),
    (("--num-epoch", "2"), "--num-epoch"), (("--async-save",), "--async-save"),
    (("--advantage-estimator", "ppo"), "--advantage-estimator ppo"),
])
def test_flags_that_fight_the_flow_are_refused(extra: tuple[str, ...], flag: str | None) -> None:
    if flag is None:  # --use-wandb is fine beside MLflow, refused as the only tracker
        assert golden_argv(extra=extra)[-1] == "--use-wandb"
        with pytest.raises(ValueError, match="--use-wandb is not allowed without MLflow"):
            check_argv(["--use-wandb"])
        return
    with pytest.raises(ValueError, match=flag):
        golden_argv(extra=extra)


def test_a_disabled_control_server_is_fine() -> None:
    assert golden_argv(extra=("--control-server-port", "0"))[-2:] == ["--control-server-port", "0"]


def test_checkpoints_elsewhere_than_the_run_dir_are_refused(tmp_path: Path) -> None:
    recipe = gpu_recipe(tmp_path, "checkpoint.save=/elsewhere")
    with pytest.raises(ValueError, match="checkpoint.save"):
        miles_argv(recipe, paths=RunPaths.of(tmp_path, "r"), prompt_data="p", eval_data={"aime": "a"},
                   hf_checkpoint="h", ref_load=None, tracking=None, start=0)


def test_make_engine_picks_miles_for_gpu_recipes(tmp_path: Path, fake: FakeMiles) -> None:
    recipe = gpu_recipe(tmp_path)
    assert engine_unavailable(recipe) is None
    assert isinstance(make_engine(recipe, paths=RunPaths.of(tmp_path, "r"), inputs=inputs(tmp_path)), MilesEngine)
    assert isinstance(load_miles_api(), type(fake.api))


def test_without_miles_a_gpu_recipe_needs_the_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_ENV, raising=False)
    recipe = gpu_recipe(tmp_path)
    if importlib.util.find_spec("miles") is not None:
        pytest.skip("miles is installed here")
    assert "miles container" in (engine_unavailable(recipe) or "")
    with pytest.raises(NotImplementedError, match="miles container"):
        make_engine(recipe, paths=RunPaths.of(tmp_path, "r"), inputs=inputs(tmp_path))


def test_miles_engine_implements_the_protocol_with_its_exact_signatures() -> None:
    import inspect

    for name in ("start", "train_rollout", "evaluate", "close"):
        assert inspect.signature(getattr(MilesEngine, name)) == inspect.signature(getattr(Engine, name)), name


def test_importing_the_project_and_making_a_gpu_engine_imports_no_miles(tmp_path: Path) -> None:
    code = f"""
import sys
import flows.cli, kimi_core.runtime.session
from kimi_core.engines import make_engine
from kimi_core.engines.base import EngineInputs
from kimi_core.recipe import load_recipe
from kimi_core.run_state import RunPaths
recipe = load_recipe({str(GPU_RECIPE)!r}, base_dir={str(tmp_path)!r})
engine = make_engine(recipe, paths=RunPaths.of({str(tmp_path)!r}, "r"), inputs=EngineInputs("t", {{"aime": "a"}}, "m"))
assert type(engine).__name__ == "MilesEngine", type(engine)
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"miles", "sglang", "megatron", "ray"}}))
"""
    env = {**os.environ, API_ENV: FAKE, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
