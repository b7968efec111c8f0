"""`kimi-grpo`: validate, render, run, status and sbatch a recipe.

Exit codes: 0 done, 2 invalid input (the message names the key path and the rule), 1 failure at run
time (the message names the stage).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from rich.console import Console
from rich.table import Table

from flows.temporary_server import TemporaryPrefectServer
from kimi_core.exit_codes import EXIT_SIGINT, EXIT_SIGTERM, INVALID_INPUT, RUN_FAILED
from kimi_core.recipe import (
    BASE_DIR_ENV,
    Recipe,
    RecipeError,
    RunPlan,
    load_recipe,
    plan_run,
    recipe_to_dict,
    resolve_path,
)
from kimi_core.run_state import SLURM_DIR, run_path

console = Console()
err_console = Console(stderr=True)


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. configs/local.yaml")
    parser.add_argument("--cluster", metavar="PROFILE", help="cluster profile: a name in configs/clusters/ or a path")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one recipe value (YAML syntax); repeatable",
    )


def _load(args: argparse.Namespace) -> Recipe:
    return load_recipe(args.recipe, overrides=args.overrides, cluster=args.cluster,
                       base_dir=getattr(args, "base_dir", None))


def _dataset_rows(recipe: Recipe) -> int | None:
    """Rows of the training data when they can be counted cheaply (a local JSONL or a synthetic URI)."""
    source = recipe.data.prompt_data
    if source.startswith("synthetic://"):
        n = parse_qs(urlparse(source).query).get("n")
        return int(n[0]) if n and n[0].isdigit() else None
    path = Path(resolve_path(recipe, source).removeprefix("file://"))
    if recipe.cluster.base_dir is None and not path.is_absolute():
        return None
    if path.suffix == ".jsonl" and path.is_file():
        with path.open("rb") as fh:
            return sum(1 for line in fh if line.strip())
    return None


def _recipe_table(recipe: Recipe) -> Table:
    table = Table(title=f"recipe {recipe.name}", show_lines=False)
    table.add_column("key", style="cyan")
    table.add_column("value")

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict) and value:
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
        else:
            table.add_row(prefix, str(value))

    walk("", recipe_to_dict(recipe))
    return table


def _schedule(ids: tuple[int, ...], limit: int = 12) -> str:
    if not ids:
        return "never"
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def plan_rows(recipe: Recipe, plan: RunPlan) -> list[tuple[str, str]]:
    """The plan as (quantity, value) rows for display."""
    stages = plan.layers_per_stage
    if len(set(stages)) == 1:
        stage_text = f"{len(stages)} x {stages[0]} layers"
    else:
        stage_text = f"{len(stages) - 1} x {stages[0]} layers + {stages[-1]}"
    evals = ("before rollout 0; " if plan.eval_before_train else "") + "after rollouts " + _schedule(plan.eval_after)
    return [
        ("world size", str(plan.world_size)),
        ("data parallel (DP)", str(plan.data_parallel)),
        ("expert data parallel", str(plan.expert_data_parallel)),
        ("pipeline stages", stage_text),
        ("SGLang engines", str(plan.num_sglang_engines)),
        ("samples per rollout", str(plan.samples_per_rollout)),
        ("global batch size", str(plan.global_batch_size)),
        ("optimizer steps per rollout", str(plan.steps_per_rollout)),
        ("rollouts", f"0 .. {plan.num_rollout - 1}"),
        ("training rows", "unknown (data not prepared)" if plan.dataset_rows is None else str(plan.dataset_rows)),
        ("rollouts per epoch", "unknown" if plan.rollouts_per_epoch is None else str(plan.rollouts_per_epoch)),
        ("eval", evals if plan.eval_before_train or plan.eval_after else "never"),
        ("save", "after rollouts " + _schedule(plan.save_after) if plan.save_after else "never"),
        ("checkpoints", resolve_path(recipe, recipe.checkpoint.save) if recipe.checkpoint.save else "not saved"),
    ]


def cmd_validate(args: argparse.Namespace) -> int:
    recipe = _load(args)
    plan = plan_run(recipe, dataset_rows=_dataset_rows(recipe))
    console.print(_recipe_table(recipe))
    table = Table(title="run plan (derived)")
    table.add_column("quantity", style="cyan")
    table.add_column("value")
    for key, value in plan_rows(recipe, plan):
        table.add_row(key, value)
    console.print(table)
    console.print(f"[green]valid[/green]: {args.recipe}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    recipe = _load(args)
    if args.what == "miles-args":
        from kimi_core.miles_args import render_miles_args  # noqa: PLC0415 - each command imports what it renders

        sys.stdout.write(render_miles_args(recipe, run_name=args.run_name))
        return 0
    if args.what == "sbatch":
        sys.stdout.write(_pipeline_script(args, recipe)[0])
        return 0
    if args.what == "ray-up":
        sys.stdout.write(_ray_up_script(args, recipe))
        return 0
    raise NotImplementedError(f"render --what {args.what}")


SBATCH_FILENAME = "kimi-k25-grpo.sbatch"
PYTHON_DEFAULT = "default: the one running kimi-grpo, or python3 with cluster.container_image"


def _slurm_run(args: argparse.Namespace, recipe: Recipe) -> tuple[str, str, str]:
    """(run name, base dir, the run's slurm/ dir) of a Slurm render; RecipeError without a Slurm profile."""
    c = recipe.cluster
    problems = []
    if c.executor != "slurm" or not c.partition:
        problems.append(f"cluster.executor is {c.executor!r}: a Slurm job needs a Slurm cluster profile "
                        "(--cluster NAME, e.g. h200 or localhost-slurm)")
    if not c.base_dir:
        problems.append(f"cluster.base_dir is not set: pass --base-dir or set ${BASE_DIR_ENV}")
    if problems:
        raise RecipeError(args.recipe, problems)
    assert c.base_dir is not None
    run_name = args.run_name or recipe.name
    return run_name, c.base_dir, run_path(c.base_dir, run_name, SLURM_DIR)


def _driver_args(args: argparse.Namespace, run_name: str, base_dir: str) -> dict[str, object]:
    return {"recipe_path": args.recipe, "run_name": run_name, "base_dir": base_dir,
            "cluster_profile": args.cluster, "overrides": list(args.overrides), "num_rollout": args.num_rollout}


def _pipeline_script(args: argparse.Namespace, recipe: Recipe) -> tuple[str, str]:
    """The pipeline sbatch script of the recipe and the run's slurm/ dir."""
    from slurm.from_recipe import job_python, training_job_request  # noqa: PLC0415 - `validate` needs no Slurm modules
    from slurm.render import render_pipeline_sbatch  # noqa: PLC0415

    run_name, base_dir, slurm_dir = _slurm_run(args, recipe)
    try:
        req = training_job_request(recipe, name=run_name, output_dir=slurm_dir)
        script = render_pipeline_sbatch(req, python=job_python(recipe, args.python), workdir=None,
                                        **_driver_args(args, run_name, base_dir))  # type: ignore[arg-type]
    except ValueError as err:
        raise RecipeError(args.recipe, [str(err)]) from None
    return script, slurm_dir


def _ray_up_script(args: argparse.Namespace, recipe: Recipe) -> str:
    """The sbatch script of the run's Ray job, exactly as the flow submits it (submitit's text)."""
    from kimi_core.run_state import RunPaths  # noqa: PLC0415 - `validate` needs no run state
    from kimi_core.runtime.ray_slurm import RayFiles  # noqa: PLC0415
    from slurm.ray_job import RaySlurmJobs  # noqa: PLC0415 - `validate` needs no Slurm modules

    run_name, base_dir, _ = _slurm_run(args, recipe)
    run_dir = RunPaths.of(base_dir, run_name).run_dir
    jobs = RaySlurmJobs.for_run(recipe, run_name=run_name, run_dir=run_dir, python=args.python,
                                deadline_mark_prefix=RayFiles.of(run_dir).deadline_prefix)
    return jobs.script()


def cmd_sbatch(args: argparse.Namespace) -> int:
    from slurm.errors import SbatchRejected  # noqa: PLC0415 - `validate` needs no Slurm modules
    from slurm.executors import sbatch_script  # noqa: PLC0415

    recipe = _load(args)
    script, slurm_dir = _pipeline_script(args, recipe)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    from flows.checks import check_scheduler  # noqa: PLC0415 - `validate` needs no Slurm modules
    from kimi_core.run_state import RunPaths  # noqa: PLC0415 - `validate` needs no run state
    from kimi_core.runtime.failures import NotRunnableHere  # noqa: PLC0415
    from kimi_core.runtime.tracking_uri import tracking_uri_for  # noqa: PLC0415

    try:  # checked here, before anything is written or submitted; the scheduler is asked last
        tracking_uri_for(recipe, RunPaths.of(recipe.cluster.base_dir or ".", args.run_name or recipe.name))
        check_scheduler(recipe)
    except NotRunnableHere as exc:
        err_console.print(f"[red]error[/red]: {exc}", highlight=False, soft_wrap=True)
        return INVALID_INPUT
    path = Path(args.output) if args.output else Path(slurm_dir) / SBATCH_FILENAME
    Path(slurm_dir).mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output dir
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    try:
        job_id = sbatch_script(path, cwd=Path.cwd())
    except (RuntimeError, OSError) as err:
        err_console.print(f"[red]sbatch failed[/red]: {err}", highlight=False, soft_wrap=True)
        return INVALID_INPUT if isinstance(err, SbatchRejected) else RUN_FAILED
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)
    console.print(f"submitted job {job_id}", highlight=False)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    recipe = _load(args)  # invalid input exits 2 here, before Prefect starts
    # Without a Prefect server to talk to, start the temporary one now: it boots while the checks
    # and imports of `_run` go on (flows/temporary_server.py).
    server = TemporaryPrefectServer.start_if_needed()
    if server is not None:
        # At exit, after Prefect's own exit hooks (registered later, run earlier) have sent the
        # run's last events to it.
        atexit.register(server.stop)
        # Nobody reads the temporary server's logs (no UI, gone at exit): the console has them all.
        os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
    return _run(args, recipe, server)


def _run(args: argparse.Namespace, recipe: Recipe, server: TemporaryPrefectServer | None) -> int:
    from flows.checks import check_scheduler  # noqa: PLC0415 - the runtime only for `run`
    from kimi_core.runtime import local_head  # noqa: PLC0415
    from kimi_core.runtime.context import RunContext  # noqa: PLC0415
    from kimi_core.runtime.failures import NotRunnableHere  # noqa: PLC0415
    from kimi_core.runtime.status import preflight  # noqa: PLC0415

    ctx = RunContext(recipe_path=args.recipe, run_name=args.run_name, cluster=args.cluster,
                     overrides=tuple(args.overrides), base_dir=args.base_dir, num_rollout=args.num_rollout)
    # A Slurm cluster that cannot take the jobs, or a recipe this install cannot run: exit 2, nothing
    # submitted or created.
    try:
        check_scheduler(recipe)
        preflight(ctx)
    except NotRunnableHere as exc:
        err_console.print(f"[red]error[/red]: {exc}", highlight=False, soft_wrap=True)
        return INVALID_INPUT
    # The flow runs in this process: its loopback Ray head starts now, beside Prefect's start and the
    # imports, and the flow's bring-up adopts it (kimi_core/runtime/local_head.py).
    local_head.start_early(ctx)
    try:
        return _run_flow(args, recipe, server)
    finally:
        local_head.stop_unadopted()


def _run_flow(args: argparse.Namespace, recipe: Recipe, server: TemporaryPrefectServer | None) -> int:
    from kimi_core.runtime.failures import NotRunnableHere  # noqa: PLC0415 - the runtime only for `run`

    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    from prefect.exceptions import TerminationSignal  # noqa: PLC0415 - Prefect only for `run`
    from prefect.settings import PREFECT_API_URL  # noqa: PLC0415

    from flows.pipeline import kimi_k25_grpo  # noqa: PLC0415 - Prefect only for `run`

    prefect_api = PREFECT_API_URL.value() if server is None else f"temporary server at {server.url}"
    console.print(f"run [bold]{args.run_name or recipe.name}[/bold] of {args.recipe} (Prefect: {prefect_api})")
    try:
        with contextlib.nullcontext() if server is None else server.api():
            summary = kimi_k25_grpo(recipe=args.recipe, run_name=args.run_name, cluster=args.cluster,
                                    overrides=args.overrides, base_dir=args.base_dir,
                                    num_rollout=args.num_rollout)
    except RecipeError:
        raise
    except NotRunnableHere as exc:
        err_console.print(f"[red]error[/red]: {exc}", highlight=False, soft_wrap=True)
        return INVALID_INPUT
    except Exception as exc:
        err_console.print(f"[red]run failed[/red]: {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
        return RUN_FAILED
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]: the run's Ray job and engine are stopped; the same "
                          "command resumes from the latest checkpoint", highlight=False)
        return EXIT_SIGINT
    except (TerminationSignal, SystemExit) as exc:
        # Prefect turns SIGTERM into TerminationSignal, and after its clean-up into SystemExit(15).
        if isinstance(exc, SystemExit) and exc.code not in (signal.SIGTERM, -signal.SIGTERM):
            raise
        err_console.print("[yellow]terminated (SIGTERM)[/yellow]: the run's Ray job and engine are stopped; the "
                          "same command resumes from the latest checkpoint", highlight=False)
        return EXIT_SIGTERM
    if summary.skipped:
        console.print(f"run {summary.run_name!r} is already complete; nothing to do")
    else:
        console.print(f"run {summary.run_name!r} finished at rollout {summary.latest_checkpoint}")
    console.print(f"MLflow run {summary.mlflow_run_id} at {summary.tracking_uri}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from kimi_core.run_state import RunPaths  # noqa: PLC0415 - `validate` needs no run state
    from kimi_core.runtime.status import run_status  # noqa: PLC0415

    base_dir = args.base_dir or os.environ.get(BASE_DIR_ENV) or ".kimi-grpo"
    paths = RunPaths.of(base_dir, args.name)
    if not paths.manifest.is_file():
        err_console.print(f"[red]error[/red]: no run {args.name!r} under {paths.base_dir}", highlight=False)
        return INVALID_INPUT
    status = run_status(paths)
    if status["ray_jobs"]:  # the Ray job of the run on Slurm: its id, what Slurm says of it, its address
        from slurm.ray_job import SlurmQueue  # noqa: PLC0415 - only runs that have a Ray job ask Slurm

        job = status["ray_jobs"][-1]
        state = SlurmQueue().state(job) if shutil.which("squeue") else "unknown (no squeue here)"
        status["ray_job"] = f"{job} {state} {status['ray_address'] or '(no address: not running)'}"
    table = Table(title=f"run {args.name}")
    table.add_column("field", style="cyan")
    table.add_column("value")
    for name, record in status.pop("stages").items():
        table.add_row(f"stage {name}", f"{record['status']} ({record['finished_at']})")
    for key, value in status.items():
        table.add_row(key, str(value))
    console.print(table)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "validate": cmd_validate,
    "render": cmd_render,
    "run": cmd_run,
    "status": cmd_status,
    "sbatch": cmd_sbatch,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimi-grpo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="print the resolved recipe and its run plan")
    _add_recipe_args(p)
    p = sub.add_parser("render", help="print a rendered artifact of the recipe")
    _add_recipe_args(p)
    p.add_argument("--what", required=True, choices=["miles-args", "sbatch", "ray-up"],
                   help="miles-args: the reference launcher's arguments; sbatch: the pipeline job "
                        "(as `sbatch --dry-run`); ray-up: the run's Ray job, exactly as the flow submits it")
    p.add_argument("--run-name", default=None)
    p.add_argument("--base-dir", default=None, help="overrides cluster.base_dir")
    p.add_argument("--num-rollout", type=int, default=None, help="absolute end rollout id (sbatch, ray-up)")
    p.add_argument("--python", default=None, help=f"interpreter in the job (sbatch, ray-up); {PYTHON_DEFAULT}")
    p = sub.add_parser("run", help="run the pipeline (resumes automatically)")
    _add_recipe_args(p)
    p.add_argument("--run-name", default=None, help="defaults to the recipe's name")
    p.add_argument("--base-dir", default=None, help="overrides cluster.base_dir")
    p.add_argument("--num-rollout", type=int, default=None, help="absolute end rollout id")
    p = sub.add_parser("sbatch", help="render the pipeline job for a Slurm profile and submit it")
    _add_recipe_args(p)
    p.add_argument("--run-name", default=None, help="defaults to the recipe's name")
    p.add_argument("--base-dir", default=None, help="overrides cluster.base_dir")
    p.add_argument("--num-rollout", type=int, default=None, help="absolute end rollout id")
    p.add_argument("--python", default=None, help=f"interpreter in the job; {PYTHON_DEFAULT}")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.add_argument("--output", default=None, metavar="PATH",
                   help=f"script path (default {{base_dir}}/runs/{{run}}/slurm/{SBATCH_FILENAME})")
    p = sub.add_parser("status", help="stages, latest checkpoint and MLflow run of a run")
    p.add_argument("name")
    p.add_argument("--base-dir", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except RecipeError as err:
        err_console.print(f"[red]error[/red]: {err}", highlight=False, soft_wrap=True)
        return INVALID_INPUT


if __name__ == "__main__":
    sys.exit(main())
