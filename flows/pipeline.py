"""The `kimi-k25-grpo` flow: puts the stages in order; no tensor, file-format or Slurm logic here."""

from __future__ import annotations

from prefect import flow

from flows.checks import check_scheduler
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.failures import SessionLost
from kimi_core.runtime.flow_steps import SessionHandle, rollout_steps
from kimi_core.runtime.progress import console
from kimi_core.runtime.status import RunSummary, completed_run, preflight
from tasks.stages import acquire_model, convert_checkpoint, prepare_data
from tasks.training import abort, bring_up_cluster, evaluate, finish, open_session, train_rollout

MAX_SESSION_REOPENS = 3


@flow(name="kimi-k25-grpo", log_prints=True)
def kimi_k25_grpo(
    recipe: str = "configs/local.yaml",
    run_name: str | None = None,
    cluster: str | None = None,
    overrides: list[str] | None = None,
    base_dir: str | None = None,
    num_rollout: int | None = None,
) -> RunSummary:
    """GRPO post-training: data -> model -> conversion (the cluster comes up meanwhile) -> the rollout
    loop, one task per rollout and per eval (docs/design.md §3)."""
    ctx = RunContext(recipe_path=recipe, run_name=run_name, cluster=cluster, overrides=tuple(overrides or ()),
                     base_dir=base_dir, num_rollout=num_rollout)
    check_scheduler(ctx.recipe())  # a Slurm cluster that cannot take the jobs: nothing is submitted
    preflight(ctx)  # an invalid recipe, or one this install cannot run, fails here: nothing is submitted
    done = completed_run(ctx)
    if done is not None:
        return done
    handle: SessionHandle | None = None
    head = None
    try:
        head = bring_up_cluster.submit(ctx)  # independent of the stages: the Ray head starts meanwhile
        data = prepare_data(ctx)
        model = acquire_model(ctx)
        convert_checkpoint(ctx, model)
        for attempt in range(MAX_SESSION_REOPENS + 1):
            cluster_info = head.result() if attempt == 0 else bring_up_cluster(ctx)
            handle = open_session(ctx, cluster_info, data, model)
            try:
                for step in rollout_steps(handle):
                    (train_rollout if step.kind == "train" else evaluate)(handle, step.rollout_id)
                break
            except SessionLost as lost:
                console.print(f"engine session lost ({lost}); bringing the cluster up again and resuming",
                              style="yellow", markup=False)
        else:
            raise SessionLost(f"the engine session was lost {MAX_SESSION_REOPENS + 1} times; giving up")
        return finish(handle)
    except BaseException as exc:
        if head is not None:
            head.wait()  # a head still starting would escape the clean-up
        # Nothing of the run keeps running; its checkpoints and manifest stay for a resume.
        try:
            abort(ctx, handle, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        except Exception as cleanup:
            console.print(f"clean-up after the failure failed too: {cleanup}", style="red", markup=False)
        raise
