"""The `kimi-k25-grpo` flow: puts the stages in order; no tensor, file-format or Slurm logic here."""

from __future__ import annotations

from typing import Any

from prefect import flow

from kimi_core.runtime.failures import SessionLost
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.ledger import console
from kimi_core.runtime.status import completed_run, validate
from tasks.training import abort, bring_up_cluster, evaluate, finish, open_session, train_rollout
from tasks.stages import acquire_model, convert_checkpoint, prepare_data

MAX_SESSION_REOPENS = 3


@flow(name="kimi-k25-grpo", log_prints=True)
def kimi_k25_grpo(
    recipe: str = "configs/local.yaml",
    run_name: str | None = None,
    cluster: str | None = None,
    overrides: list[str] | None = None,
    base_dir: str | None = None,
    num_rollout: int | None = None,
) -> dict[str, Any]:
    """GRPO post-training: data -> model -> conversion (the cluster comes up meanwhile) -> one task per
    rollout -> eval."""
    ctx = RunContext(recipe_path=recipe, run_name=run_name, cluster=cluster, overrides=tuple(overrides or ()),
                     base_dir=base_dir, num_rollout=num_rollout)
    validate(ctx)  # an invalid recipe fails here, before any job is submitted
    done = completed_run(ctx)
    if done is not None:
        return done
    session, head = None, None
    try:
        head = bring_up_cluster.submit(ctx)  # independent of the stages: the Ray head starts meanwhile
        data = prepare_data(ctx)
        model = acquire_model(ctx)
        convert_checkpoint(ctx, model)
        for attempt in range(MAX_SESSION_REOPENS + 1):
            cluster_info = head.result() if attempt == 0 else bring_up_cluster(ctx)
            session = open_session(ctx, cluster_info, data, model)
            try:
                run_rollouts(ctx, session)
                break
            except SessionLost as lost:
                console.print(f"engine session lost ({lost}); bringing the cluster up again and resuming",
                              style="yellow", markup=False)
        else:
            raise SessionLost(f"the engine session was lost {MAX_SESSION_REOPENS + 1} times; giving up")
        return finish(ctx, session)
    except BaseException as exc:
        if head is not None:
            head.wait()  # a head still starting would escape the clean-up
        # Nothing of the run keeps running; its checkpoints and manifest stay for a resume.
        try:
            abort(ctx, session, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        except Exception as cleanup:  # noqa: BLE001 - report, but keep the run's own error
            console.print(f"clean-up after the failure failed too: {cleanup}", style="red", markup=False)
        raise


def run_rollouts(ctx: RunContext, session: dict[str, Any]) -> None:
    """The per-rollout story: train (saves when due), then eval when due (DESIGN §4)."""
    schedule = validate(ctx)
    for rollout_id in session["pending_evals"]:  # before training at 0, or one a crash interrupted
        evaluate(ctx, session, rollout_id)
    for rollout_id in range(session["start"], schedule.num_rollout):
        train_rollout(ctx, session, rollout_id)
        if schedule.is_eval_due(rollout_id):
            evaluate(ctx, session, rollout_id)
