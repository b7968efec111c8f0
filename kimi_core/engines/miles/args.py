"""The argv `MilesEngine` hands to miles' `parse_args` (docs/design.md §5, §8).

A pure function of the recipe and what the stages produced: the render groups of
`kimi_core.miles_args` (the flags of the reference launcher), with the paths replaced by this
run's: the prepared data, the stage outputs for `--hf-checkpoint` / `--ref-load`, and the run's
checkpoint dir as both `--load` and `--save` (miles decides fresh start or resume from it at parse
time). miles logs its metrics into the run's MLflow run through its MLflow backend
(`--use-mlflow --mlflow-tracking-uri --mlflow-experiment-name --mlflow-run-id`,
`miles/utils/arguments.py` @31f1ca961); the engine never creates a miles-side run (it skips
`init_tracking`, see `engine.py`), so every miles process attaches to that run id.

Flags that fight the flow are refused with a `ValueError` naming the flag (`REFUSED`).
"""

from __future__ import annotations

from collections.abc import Sequence

from kimi_core.engines.base import TrackingTarget
from kimi_core.miles_args import Flag, miles_arg_groups
from kimi_core.recipe.sections import RUN_DIR, Recipe
from kimi_core.run_state import RunPaths

#: Flags the flow owns or that train.py @31f1ca961 pairs with calls this engine does not make.
REFUSED: dict[str, str] = {
    "--fully-async": "it needs miles' asynchronous driver (train_async.py); the engine mirrors train.py's loop",
    "--start-rollout-id": "the first rollout is the latest checkpoint + 1, which the engine checks miles derives",
    "--num-epoch": "the run length is the recipe's rollout.num_rollout",
    "--control-server-port": "miles' HTTP control server would drive rollouts behind the flow's back",
    "--mini-ft-controller-enable": "the mini FT controller needs the control server",
    "--save-trigger-sentinel": "the flow decides saves (a stop request saves with force_sync)",
    "--debug-exit-after-rollout": "the flow decides when to stop",
    "--check-weight-update-equal": "train.py's weight-check calls are not mirrored by the engine",
    "--ci-test": "it turns on train.py's weight-check calls, which the engine does not mirror",
    "--async-save": "the engine reports a checkpoint only once it is committed (asynchronous saves: a later step)",
    "--use-distributed-post": "it creates detached actors that outlive the engine session",
    "--use-prometheus": "its named collector actor clashes between sessions",
}
#: Flags the engine sets itself; passing them again is refused.
OWNED = ("--load", "--save", "--hf-checkpoint", "--ref-load", "--prompt-data", "--eval-prompt-data",
         "--num-rollout", "--use-mlflow", "--mlflow-tracking-uri", "--mlflow-experiment-name", "--mlflow-run-id",
         "--skip-eval-before-train")


def _replace(flags: list[Flag], name: str, new: Flag | None) -> list[Flag]:
    """`flags` with the flag `name` replaced by `new` (in place, or appended), or dropped when None."""
    out = [f for f in flags if f[0] != name] if new is None else [new if f[0] == name else f for f in flags]
    if new is not None and all(f[0] != name for f in flags):
        out.append(new)
    return out


def check_argv(argv: Sequence[str], *, extra: Sequence[str] = ()) -> None:
    """Raise `ValueError` naming the first flag of `argv` that fights the flow; `extra` (flags a user
    added) may not set what the engine owns."""
    tokens = list(argv)
    for index, token in enumerate(tokens):
        if token == "--control-server-port" and index + 1 < len(tokens) and tokens[index + 1] == "0":
            continue  # 0 = disabled, miles' default
        if token in REFUSED:
            raise ValueError(f"miles flag {token} is not allowed: {REFUSED[token]}")
        if token == "--advantage-estimator" and index + 1 < len(tokens) and tokens[index + 1] == "ppo":
            raise ValueError("miles flag --advantage-estimator ppo is not allowed: the engine does not mirror "
                             "train.py's critic path")
    if "--use-wandb" in tokens and "--use-mlflow" not in tokens:
        raise ValueError("miles flag --use-wandb is not allowed without MLflow: miles must log to the run's MLflow run")
    for token in extra:
        if token in OWNED:
            raise ValueError(f"miles flag {token} is set by the engine (from the recipe and the run); remove it")


def miles_argv(recipe: Recipe, *, paths: RunPaths, prompt_data: str, eval_data: dict[str, str],
               hf_checkpoint: str, ref_load: str | None, tracking: TrackingTarget | None, start: int,
               extra: Sequence[str] = ()) -> list[str]:
    """`argv[1:]` for miles' `parse_args` (no program name).

    `start` is the first rollout this session will run: on a resume (`start > 0`), and on a run
    without an eval before training, `--skip-eval-before-train` tells miles what the flow does
    (the flow runs the evals; docs/design.md §4.1). `eval_data` maps each eval set name of the
    recipe to its prepared file.
    """
    ck = recipe.checkpoint
    for key, value in (("checkpoint.save", ck.save), ("checkpoint.load", ck.load)):
        if value not in (None, RUN_DIR):
            raise ValueError(f"{key} = {value!r}: the miles engine loads and saves in the run directory only "
                             f"({key}: {RUN_DIR})")
    names = [d.name for d in recipe.eval.datasets]
    if sorted(names) != sorted(eval_data):
        raise ValueError(f"eval data for {sorted(eval_data)} does not match the recipe's eval sets {names}")
    groups = miles_arg_groups(recipe, run_name=paths.run_name)
    checkpoints = str(paths.checkpoints)
    ckpt = groups["CKPT_ARGS"]
    ckpt = _replace(ckpt, "--hf-checkpoint", ("--hf-checkpoint", hf_checkpoint))
    ckpt = _replace(ckpt, "--ref-load", None if ref_load is None else ("--ref-load", ref_load))
    ckpt = _replace(ckpt, "--load", ("--load", checkpoints))
    ckpt = _replace(ckpt, "--save", ("--save", checkpoints))
    groups["CKPT_ARGS"] = ckpt
    groups["ROLLOUT_ARGS"] = _replace(groups["ROLLOUT_ARGS"], "--prompt-data", ("--prompt-data", prompt_data))
    if names:
        pairs = tuple(part for name in names for part in (name, eval_data[name]))
        groups["EVAL_ARGS"] = _replace(groups["EVAL_ARGS"], "--eval-prompt-data", ("--eval-prompt-data", *pairs))
        eval_before_train = recipe.eval.before_train
        if start > 0 or not eval_before_train:
            groups["EVAL_ARGS"].append(("--skip-eval-before-train",))
    if tracking is not None:
        groups["TRACKING_ARGS"] = [("--use-mlflow",), ("--mlflow-tracking-uri", tracking.tracking_uri),
                                   ("--mlflow-experiment-name", tracking.experiment),
                                   ("--mlflow-run-id", tracking.run_id)]
    argv = [token for flags in groups.values() for flag in flags for token in flag] + list(extra)
    check_argv(argv, extra=extra)
    return argv


def render_argv(argv: Sequence[str]) -> str:
    """One flag with its values per line (the golden-file format)."""
    lines: list[str] = []
    for token in argv:
        if token.startswith("--") or not lines:
            lines.append(token)
        else:
            lines[-1] += " " + token
    return "\n".join(lines) + "\n"
