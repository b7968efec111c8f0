"""The `kimi-k25-grpo` flow: puts the stages in order; no tensor, file-format or Slurm logic here."""

from __future__ import annotations

from prefect import flow

from flows.checks import check_scheduler
from kimi_core.runtime.context import RunContext
from kimi_core.runtime.failures import SessionLost
from kimi_core.runtime.flow_steps import SessionHandle, on_slurm, progress, rolled_over, rollout_steps
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
    """GRPO post-training: data -> model -> conversion -> the Ray cluster (a loopback head starts
    beside the stages; a Slurm Ray job after them) -> the rollout loop, one task per rollout and per
    eval; a lost cluster or a Ray job at its deadline is brought up again and the loop resumes
    (docs/design.md §3, §6)."""
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
        if not on_slurm(ctx):  # the local head starts beside the stages
            head = bring_up_cluster.submit(ctx)
        data = prepare_data(ctx)
        model = acquire_model(ctx)
        convert_checkpoint(ctx, model)
        # On Slurm the Ray job is submitted after the stages: no allocation idles through a conversion.
        cluster_info = head.result() if head is not None else bring_up_cluster(ctx)
        lost_at, losses = progress(ctx), 0
        while True:
            handle = open_session(ctx, cluster_info, data, model)
            try:
                for step in rollout_steps(handle):
                    (train_rollout if step.kind == "train" else evaluate)(handle, step.rollout_id)
                if not rolled_over(handle):
                    break
            except SessionLost as lost:
                # Only losses without a new checkpoint in between count towards the limit.
                losses, lost_at = (losses + 1, lost_at) if progress(ctx) == lost_at else (1, progress(ctx))
                if losses > MAX_SESSION_REOPENS:
                    raise SessionLost(f"the engine session was lost {losses} times without progress; "
                                      f"giving up (last: {lost})") from lost
                console.print(f"engine session lost ({lost}); bringing the cluster up again and resuming",
                              style="yellow", markup=False)
            cluster_info = bring_up_cluster(ctx)
        return finish(handle)
    except BaseException as exc:
        if head is not None:
            head.wait()  # a head still starting would escape the clean-up
        # Nothing of the run keeps running; its checkpoints and manifest stay for a resume.
        try:
            abort(ctx, handle, "FAILED" if isinstance(exc, Exception) else "KILLED")
        except Exception as cleanup:
            console.print(f"clean-up after the failure failed too: {cleanup}", style="red", markup=False)
        raise
