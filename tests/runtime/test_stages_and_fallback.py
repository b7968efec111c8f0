"""Stage caches keyed by content, and a stop request that arrives before the engine exists.

Both go through the sbatch fallback's in-process path (the same stage functions the flow's jobs
run) on the local recipe made tiny, with real files: a JSONL source, the built base model, its
megatron-core torch_dist conversion.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from kimi_core import stages
from kimi_core.exit_codes import REQUEUE_EXIT
from kimi_core.run_state import latest_checkpoint
from kimi_core.runtime import session as session_mod
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.fallback import _stages, run_in_allocation
from kimi_core.runtime.ledger import RunLedger
from kimi_core.runtime.loop import StopRequest

REPO = Path(__file__).resolve().parents[2]
ROWS = [{"prompt": f"What is max({a}, {b})? Put the answer in \\boxed{{}}.", "label": str(max(a, b))}
        for a, b in [(3, 7), (12, 5), (40, 41), (9, 9), (1, 2), (8, 3)]]


def _ctx(base: Path, source: Path, run: str) -> RunContext:
    tiny = ["model.warmup.steps=5", "model.warmup.batch_size=4", f"data.prompt_data={source}",
            f'eval.datasets=[{{name: arith, path: "{source}"}}]', "rollout.rollout_batch_size=2",
            "rollout.n_samples_per_prompt=2", "rollout.global_batch_size=4", "eval.n_samples_per_prompt=2"]
    return RunContext(recipe_path=str(REPO / "configs/local.yaml"), run_name=run, base_dir=str(base),
                      overrides=tuple(tiny), num_rollout=2)


def _rewrite_in_place(path: Path, offset: int) -> None:
    """Change one byte of `path`, keeping its size and its mtime."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def _cached(ledger: RunLedger) -> dict[str, bool]:
    ledger.manifest = type(ledger.manifest).load(ledger.paths)
    return {name: record.cached for name, record in ledger.manifest.stages.items()}


def _untimed(result: dict | None) -> dict | None:
    """A convert_checkpoint result without the seconds each lookup measures."""
    if result is None:
        return None
    return {**result, "conversions": [{k: v for k, v in c.items() if k != "seconds"} for c in result["conversions"]]}


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def test_a_stage_redoes_its_work_when_its_input_changes_in_place(tmp_path: Path, source: Path) -> None:
    ledger = RunLedger(_ctx(tmp_path / "base", source, "content"))
    recipe, paths = ledger.recipe, ledger.paths
    assert stages.current_data(recipe, paths) is None and stages.current_model(recipe, paths) is None
    _data, model = _stages(ledger)
    assert _cached(ledger) == {"prepare_data": False, "acquire_model": False, "convert_checkpoint": False}
    found = (stages.current_data(recipe, paths), stages.current_model(recipe, paths),
             stages.current_conversion(recipe, paths, hf_checkpoint=model["hf_checkpoint"]))
    again = _stages(ledger)
    assert _cached(ledger) == {"prepare_data": True, "acquire_model": True, "convert_checkpoint": True}
    # the checks the flow makes before a local stage job find exactly what the stages return
    assert found[:2] == again
    assert _untimed(found[2]) == _untimed(ledger.manifest.stages["convert_checkpoint"].result)
    assert found[2] is not None and found[2]["cached"]

    # same size, same mtime, other content: "12" -> "13" in the second row's label
    text = source.read_text()
    _rewrite_in_place(source, text.index('"label": "12"') + len('"label": "1'))
    shard = next(Path(model["hf_checkpoint"]).glob("*.safetensors"))
    _rewrite_in_place(shard, shard.stat().st_size - 3)  # a byte of the last tensor's data
    assert stages.current_data(recipe, paths) is None  # the source's content changed
    assert stages.current_conversion(recipe, paths, hf_checkpoint=model["hf_checkpoint"]) is None  # the shard's
    data, _model = _stages(ledger)
    assert _cached(ledger) == {"prepare_data": False, "acquire_model": True, "convert_checkpoint": False}
    labels = [json.loads(line)["label"] for line in Path(data["train"]["path"]).read_text().splitlines()]
    assert "13" in labels and "12" not in labels


def test_a_stop_request_before_the_engine_exists_starts_no_rollout(tmp_path: Path, source: Path) -> None:
    ctx = _ctx(tmp_path / "base", source, "early-stop")
    stop = StopRequest()
    stop.request("SIGUSR1")  # e.g. the deadline signal during data prep or conversion
    assert run_in_allocation(ctx, stop) == REQUEUE_EXIT
    ledger = RunLedger(ctx)
    assert latest_checkpoint(ledger.paths) is None  # no rollout trained, nothing half-saved
    assert not list(ledger.paths.checkpoints.iterdir()) or not any(
        p.name.startswith("iter_") for p in ledger.paths.checkpoints.iterdir())
    assert ledger.manifest.resume_history == [] and ledger.manifest.mlflow_run_id is None
    assert {"prepare_data", "acquire_model", "convert_checkpoint"} <= set(ledger.manifest.stages)  # kept for the requeue


def test_the_session_runs_every_engine_call_on_one_thread_of_its_own(
        tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls arriving on different threads (a threaded Ray actor's pool) all reach the engine on the
    session's one engine thread, its construction included; an engine error comes back as itself."""
    ledger = RunLedger(_ctx(tmp_path / "base", source, "threads"))
    data, model = _stages(ledger)
    seen: list[tuple[str, int]] = []

    def spy(name: str, call):
        def recorded(*args, **kwargs):
            seen.append((name, threading.get_ident()))
            return call(*args, **kwargs)
        return recorded

    monkeypatch.setattr(session_mod, "make_engine", spy("make_engine", session_mod.make_engine))
    engine_session = session_mod.EngineSession(ledger.ctx, ledger.engine_inputs(data, model), num_threads=1)
    for name in ("start", "train_rollout", "evaluate", "close"):
        setattr(engine_session.engine, name, spy(name, getattr(engine_session.engine, name)))
    assert engine_session.start() == 0
    other = threading.Thread(target=engine_session.train_rollout, args=(0,), kwargs={"save": False, "force_sync": False})
    other.start()
    other.join()
    assert engine_session.last is not None and engine_session.last.rollout_id == 0
    assert "eval/arith" in engine_session.evaluate(0).metrics
    with pytest.raises(session_mod.SessionOutOfStep):
        engine_session.train_rollout(5, save=False, force_sync=False)
    engine_session.engine.train_rollout = spy("train_rollout", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        engine_session.train_rollout(1, save=False, force_sync=False)
    engine_session.close()
    for thread in threading.enumerate():  # the engine thread ends after close
        if thread.ident in {ident for _, ident in seen}:
            thread.join(timeout=10)
            assert not thread.is_alive()
    assert [name for name, _ in seen] == ["make_engine", "start", "train_rollout", "evaluate", "train_rollout", "close"]
    threads = {ident for _, ident in seen}
    assert len(threads) == 1 and threads.isdisjoint({threading.get_ident(), other.ident})
