"""Learning curve of the local recipe: GRPO from the warmed-up base model, no orchestration.

Builds (or reuses) the recipe's base model (`model.warmup`), prepares the recipe's train and eval
data, then runs the one rollout loop (`kimi_core.runtime.loop`) over a `LocalEngine` in this
process for `rollout.num_rollout` rollouts (or `--rollouts`), with the recipe's schedule: eval on
the held-out eval split before the first rollout and every `eval.interval` rollouts, saves every
`checkpoint.save_interval`. Prints one table row per eval (rollout id, eval score = mean reward of the eval
samples, mean training reward of the rollouts since the previous eval) and ends with

    RESULT base_eval=<x> final_eval=<y> rollouts=<n> wall_s=<s>

`wall_s` is the time spent in GRPO rollouts (sampling + scoring + update) only: the warm-up and
the evals are timed on their own lines. The base model is cached under `--workdir` keyed by the
architecture and warm-up sections, so a second run skips the warm-up. `--time-budget` asks the
loop to stop (after a save) once the GRPO time passes it.

    python benchmarks/learning_curve.py [--config configs/local.yaml] [--workdir DIR]
        [--rollouts N] [--time-budget S] [--threads 1] [--set key=value ...]

`--threads` sets torch's intra-op threads for the GRPO loop (the warm-up uses
`model.warmup.num_threads`). One is the default: the tiny model's ops are too small to gain much
from a second thread, and on a box whose other core is busy, OpenMP threads waiting on each other
make a rollout many times slower.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch

from kimi_core.data import prepare_dataset
from kimi_core.engines.base import EvalResult, RolloutResult
from kimi_core.engines.local import EngineInputs, LocalEngine
from kimi_core.model.warmup import build_base_model
from kimi_core.recipe import Recipe, load_recipe, plan_run
from kimi_core.run_state import RunPaths
from kimi_core.runtime.loop import RolloutLoop, StopRequest


def base_model(recipe: Recipe, workdir: Path) -> tuple[Path, float, bool]:
    """The cached base model dir for the recipe's architecture + warm-up; (dir, warm-up seconds, built now)."""
    if recipe.model.warmup is None:
        raise ValueError("the recipe has no model.warmup section: the learning curve needs build:tiny")
    key = json.dumps([recipe.model.architecture.model_dump(), recipe.model.warmup.model_dump()], sort_keys=True)
    target = workdir / "base" / hashlib.sha256(key.encode()).hexdigest()[:16]
    marker = target / "warmup.json"
    if marker.is_file():
        return target, float(json.loads(marker.read_text())["warmup/seconds"]), False
    tmp = Path(tempfile.mkdtemp(prefix=".base-", dir=workdir))
    stats = build_base_model(recipe.model.architecture, tmp, spec=recipe.model.warmup)
    (tmp / "warmup.json").write_text(json.dumps(stats))
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)
    return target, float(stats["warmup/seconds"]), True


def make_engine(recipe: Recipe, workdir: Path, base_dir: Path) -> tuple[LocalEngine, str]:
    """A started engine on the recipe's train data and its first eval set; returns (engine, eval name)."""
    data_dir = workdir / "data"
    train = prepare_dataset(recipe.data.prompt_data, out_dir=data_dir, name="train",
                            input_key=recipe.data.input_key, label_key=recipe.data.label_key)
    dataset = recipe.eval.datasets[0]
    held_out = prepare_dataset(dataset.path, out_dir=data_dir, name=f"eval-{dataset.name}",
                               input_key=recipe.data.input_key, label_key=recipe.data.label_key)
    paths = RunPaths.of(workdir / "runs", "learning-curve")
    shutil.rmtree(paths.run_dir, ignore_errors=True)  # the loop saves on the schedule: start each run afresh
    paths.ensure()
    engine = LocalEngine(recipe, paths=paths,
                         inputs=EngineInputs(str(train.path), {dataset.name: str(held_out.path)}, str(base_dir)))
    engine.start(None)
    return engine, dataset.name


class CurveRecorder:
    """The loop's recorder here: one table row per eval (the eval score, the mean training reward of
    the rollouts since the previous eval, GRPO seconds so far); stops the loop past the time budget."""

    def __init__(self, name: str, stop: StopRequest, budget_s: float):
        self.name, self.stop, self.budget_s = name, stop, budget_s
        self.rows: list[dict[str, float]] = []
        self.grpo_s, self.done, self.rewards = 0.0, 0, []  # type: ignore[var-annotated]
        self.eval_started = time.perf_counter()
        print(f"{'rollout':>8} {'eval':>8} {'mean_reward':>12} {'grpo_s':>8} {'eval_s':>7}")

    def rollout(self, result: RolloutResult, *, step_time: float, log_metrics: bool) -> RolloutResult:
        self.grpo_s += step_time
        self.done = result.rollout_id + 1
        self.rewards.append(result.metrics["rollout/raw_reward"])
        if self.grpo_s >= self.budget_s:
            self.stop.request("time budget")
        self.eval_started = time.perf_counter()
        return result

    def eval(self, result: EvalResult, *, log_metrics: bool) -> EvalResult:
        rollout = result.rollout_id if self.done else -1  # -1: the eval before training
        reward = sum(self.rewards) / len(self.rewards) if self.rewards else float("nan")
        row = {"rollout": rollout, "eval": result.metrics[f"eval/{self.name}"], "reward": reward,
               "grpo_s": self.grpo_s, "eval_s": time.perf_counter() - self.eval_started}
        print(f"{row['rollout']:>8d} {row['eval']:>8.3f} {row['reward']:>12.3f} {row['grpo_s']:>8.1f} {row['eval_s']:>7.1f}",
              flush=True)
        self.rows.append(row)
        self.rewards = []
        return result


def run_curve(recipe: Recipe, engine: LocalEngine, name: str, *, budget_s: float) -> CurveRecorder:
    """The one rollout loop over the engine: rollouts, saves and evals on the recipe's schedule."""
    stop = StopRequest()
    recorder = CurveRecorder(name, stop, budget_s)
    plan = plan_run(recipe)
    RolloutLoop(session=engine, plan=plan, recorder=recorder, start=0, stop=stop,
                pending_evals=RolloutLoop.evals_owed(plan, start=0, logged_evals=set())).run()
    return recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "local.yaml"))
    parser.add_argument("--workdir", default=None, help="caches the base model and data; default: a temp dir")
    parser.add_argument("--rollouts", type=int, default=None, help="default: the recipe's rollout.num_rollout")
    parser.add_argument("--time-budget", type=float, default=600.0, help="stop after this many GRPO seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the GRPO loop")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [*args.overrides, *([f"rollout.num_rollout={args.rollouts}"] if args.rollouts else [])]
    recipe = load_recipe(args.config, overrides=overrides)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="learning-curve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base_dir, warmup_s, built = base_model(recipe, workdir)
    print(f"warm-up: {recipe.model.warmup.steps} steps, {warmup_s:.1f} s ({'built now' if built else 'cached'}) -> {base_dir}")
    engine, name = make_engine(recipe, workdir, base_dir)
    curve = run_curve(recipe, engine, name, budget_s=args.time_budget)
    rows, grpo_s, done = curve.rows, curve.grpo_s, curve.done
    print(f"per-rollout: {grpo_s / max(done, 1):.2f} s; evals: {sum(r['eval_s'] for r in rows):.1f} s in all")
    print(f"RESULT base_eval={rows[0]['eval']:.3f} final_eval={rows[-1]['eval']:.3f} rollouts={done} wall_s={grpo_s:.1f}")


if __name__ == "__main__":
    main()
