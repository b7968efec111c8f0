"""The pipeline inside one allocation, without a Prefect server (the sbatch fallback).

Runs the same stages as the flow, in order, in this process: the engine session lives here too.
SIGUSR1 or SIGTERM (the time-limit signal, a preemption, `scontrol requeue`) asks the engine to
save at the next rollout boundary; the process then exits with `REQUEUE_EXIT` so the batch
script requeues the job, and the requeued job resumes from that checkpoint.

    python -m kimi_core.runtime.fallback RECIPE [--run-name N] [--base-dir D] [--cluster P] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from kimi_core.engines.base import EngineInputs
from kimi_core import stages
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.ledger import Progress, RunDriver, console
from kimi_core.runtime.jobs import convert_key, data_key, model_key
from kimi_core.runtime.status import completed_run
from kimi_core.recipe import RecipeError
from kimi_core.runtime.session import EngineSession, engine_threads

REQUEUE_EXIT = 3


class _Stop:
    """Set by the signal handlers; read at rollout boundaries."""

    requested = False
    session: EngineSession | None = None

    @classmethod
    def handler(cls, signum: int, frame: FrameType | None) -> None:
        cls.requested = True
        console.print(f"signal {signal.Signals(signum).name}: saving at the next rollout boundary")
        if cls.session is not None:
            cls.session.request_save()


def _stages(driver: RunDriver) -> tuple[dict[str, Any], dict[str, Any]]:
    recipe, paths = driver.recipe, driver.paths
    data = driver.stage("prepare_data", lambda: stages.prepare_data(recipe, paths), key=data_key(recipe))
    model = driver.stage("acquire_model", lambda: stages.acquire_model(recipe, paths), key=model_key(recipe))
    driver.stage("convert_checkpoint",
                 lambda: stages.convert_checkpoint(recipe, paths, hf_checkpoint=model["hf_checkpoint"]),
                 key=convert_key(recipe, model))
    return data, model


def run_in_allocation(ctx: RunContext) -> int:
    """All stages and rollouts of the run; returns the process exit code."""
    if completed_run(ctx) is not None:
        return 0
    driver = RunDriver(ctx)
    data, model = _stages(driver)
    start = driver.start_rollout_id()
    attempt = driver.manifest.begin_attempt(reason="sbatch" if start == 0 else "resume", start_rollout_id=start)
    if os.environ.get("SLURM_JOB_ID"):
        driver.manifest.add_slurm_job_id(os.environ["SLURM_JOB_ID"])
    driver.open_tracking(attempt=attempt, engine="local")
    inputs = EngineInputs(train_data=data["train"]["path"], eval_data={n: e["path"] for n, e in data["eval"].items()},
                          initial_checkpoint=model["hf_checkpoint"])
    session = EngineSession(ctx, inputs, num_threads=engine_threads())
    _Stop.session = session
    start = session.start()
    driver.manifest.set_start_rollout(start)
    books = driver.resume_bookkeeping(start)
    logged = books["rollouts"]
    progress = Progress(start=start, end=driver.recipe.rollout.num_rollout)
    for rollout_id in books["pending_evals"]:
        progress.eval(rollout_id, _evaluate(driver, session, rollout_id))
    for rollout_id in range(start, driver.recipe.rollout.num_rollout):
        started = time.perf_counter()
        result = session.train_rollout(rollout_id)
        driver.record_rollout(rollout_id, result, step_time=time.perf_counter() - started,
                              skip_metrics=rollout_id in logged)
        progress.rollout(rollout_id, result["metrics"])
        if driver.plan.is_eval_due(rollout_id):
            progress.eval(rollout_id, _evaluate(driver, session, rollout_id))
        if _Stop.requested and result["checkpoint"] and rollout_id < driver.recipe.rollout.num_rollout - 1:
            console.print(f"saved rollout {rollout_id}; exiting for requeue")
            driver.tracker.log_curves_png()
            driver.tracker.close("KILLED")
            return REQUEUE_EXIT
    driver.tracker.log_curves_png()
    driver.tracker.close("FINISHED")
    driver.manifest.update(finished=True)
    console.print(f"run {driver.paths.run_name!r} complete")
    return 0


def _evaluate(driver: RunDriver, session: EngineSession, rollout_id: int) -> dict[str, float]:
    result = session.evaluate(rollout_id)
    already = rollout_id in driver.logged_eval_steps()
    driver.record_eval(rollout_id, result, skip_metrics=already)
    return result["metrics"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kimi_core.runtime.fallback", description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--run-name")
    parser.add_argument("--base-dir")
    parser.add_argument("--cluster")
    parser.add_argument("--num-rollout", type=int)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, _Stop.handler)
    ctx = RunContext(recipe_path=args.recipe, run_name=args.run_name, cluster=args.cluster,
                     overrides=tuple(args.overrides), base_dir=args.base_dir, num_rollout=args.num_rollout)
    try:
        return run_in_allocation(ctx)
    except RecipeError as err:
        console.print(f"[red]error[/red]: {err}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
