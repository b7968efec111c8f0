"""The pipeline inside one allocation, without a Prefect server (the sbatch fallback).

Runs the same stages as the flow, in order, in this process, then the one rollout loop with the
engine session in this process too. SIGUSR1 or SIGTERM (the time-limit signal, a preemption,
`scontrol requeue`) — at any moment, during the stages as well — is a stop request: the loop saves
at the next rollout boundary (or starts no rollout at all when nothing is unsaved), and the
process exits with `REQUEUE_EXIT` so the batch script requeues the job, which resumes from that
checkpoint.

    python -m kimi_core.runtime.fallback RECIPE [--run-name N] [--base-dir D] [--cluster P] [--num-rollout N] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from kimi_core import stages
from kimi_core.exit_codes import INVALID_INPUT, REQUEUE_EXIT
from kimi_core.recipe import RecipeError
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.jobs import stage_key
from kimi_core.runtime.ledger import RunLedger
from kimi_core.runtime.loop import StopRequest
from kimi_core.runtime.progress import console
from kimi_core.runtime.session import EngineSession, engine_threads
from kimi_core.runtime.status import completed_run


def _stages(ledger: RunLedger) -> tuple[dict[str, Any], dict[str, Any]]:
    recipe, paths = ledger.recipe, ledger.paths
    data = ledger.stage("prepare_data", lambda: stages.prepare_data(recipe, paths), key=stage_key("prepare_data", recipe))
    model = ledger.stage("acquire_model", lambda: stages.acquire_model(recipe, paths),
                         key=stage_key("acquire_model", recipe))
    ledger.stage("convert_checkpoint",
                 lambda: stages.convert_checkpoint(recipe, paths, hf_checkpoint=model["hf_checkpoint"]),
                 key=stage_key("convert_checkpoint", recipe))
    return data, model


def _close_engine(session: EngineSession) -> None:
    """Close the engine before the MLflow run ends (miles disposes its rollout engines)."""
    try:
        session.close()
    except Exception as exc:  # a broken engine: this process ends next, which frees it
        console.print(f"engine not closed cleanly ({type(exc).__name__}: {exc})", markup=False)


def run_in_allocation(ctx: RunContext, stop: StopRequest) -> int:
    """All stages and rollouts of the run; returns the process exit code."""
    if completed_run(ctx) is not None:
        return 0
    ledger = RunLedger(ctx)
    data, model = _stages(ledger)
    if stop.requested:  # before any engine exists: nothing is unsaved, so no rollout starts
        console.print(f"stop requested ({stop.reason}) before training; exiting for requeue", markup=False)
        return REQUEUE_EXIT
    first = ledger.start_rollout_id()
    attempt = ledger.manifest.begin_attempt(reason="sbatch" if first == 0 else "resume", start_rollout_id=first)
    if os.environ.get("SLURM_JOB_ID"):
        ledger.manifest.add_slurm_job_id(os.environ["SLURM_JOB_ID"])
    tracker = ledger.open_tracking(attempt=attempt)  # before the engine: miles logs to it
    session = EngineSession(ctx, ledger.engine_inputs(data, model), num_threads=engine_threads())
    start = session.start()
    ledger.manifest.set_start_rollout(start)
    loop = ledger.rollout_loop(session, start=start, stop=stop)
    try:
        outcome = loop.run()
    except BaseException:
        _close_engine(session)
        tracker.close("FAILED")  # last: miles' exit hooks may have ended the run as FINISHED
        raise
    tracker.log_curves_png()
    _close_engine(session)
    if not outcome.finished:
        console.print(f"stop requested ({stop.reason}): saved rollout {outcome.last_rollout}; exiting for requeue",
                      markup=False)
        tracker.close("KILLED")
        return REQUEUE_EXIT
    tracker.close("FINISHED")
    ledger.manifest.update(finished=True)
    console.print(f"run {ledger.paths.run_name!r} complete", markup=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kimi_core.runtime.fallback", description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--run-name")
    parser.add_argument("--base-dir")
    parser.add_argument("--cluster")
    parser.add_argument("--num-rollout", type=int)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    stop = StopRequest()
    stop.install((signal.SIGUSR1, signal.SIGTERM), announce=lambda line: console.print(line, markup=False))
    ctx = RunContext(recipe_path=args.recipe, run_name=args.run_name, cluster=args.cluster,
                     overrides=tuple(args.overrides), base_dir=args.base_dir, num_rollout=args.num_rollout)
    try:
        return run_in_allocation(ctx, stop)
    except RecipeError as err:
        console.print(f"[red]error[/red]: {err}", highlight=False, soft_wrap=True)
        return INVALID_INPUT


if __name__ == "__main__":
    sys.exit(main())
