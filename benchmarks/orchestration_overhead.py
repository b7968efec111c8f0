"""Orchestration overhead: the same rollouts through the full flow vs a bare `LocalEngine` loop.

Both sides run the local recipe (`configs/local.yaml`) with the same overrides, the same rollouts,
the same checkpoint saves and the same evals, with the same torch thread count (`--threads`):

* flow: `kimi-grpo run` in a subprocess (ephemeral Prefect unless `PREFECT_API_URL` is set; MLflow
  to the default sqlite file under the base dir): Prefect tasks per stage and per rollout, a local
  Ray head, the engine in a detached Ray actor, metrics logged to MLflow, the run manifest;
* bare: the same rollout loop (`kimi_core.runtime.loop`) over a `LocalEngine` in a fresh Python
  process of its own (this script with `--bare`), as the flow's engine runs in a fresh actor
  process: the same saves (inside the rollout, with the same per-checkpoint metrics file) and
  evals, with nothing logged. It runs once before and once after the flow (load on a shared
  machine drifts); `bare_s` is the mean. A fresh process matters: one that has already run the
  engine has its heap grown (the first rollouts of a new process touch fresh pages, which is slow
  on a small VM), and one that imported megatron-core (the conversion) carries its objects
  through every garbage collection.

Overrides (printed at start; `--set` adds more, `--rollouts` sets the count, at least 20):

    model.warmup.steps=20            short warm-up: the base model is a setup cost, not measured
    rollout.rollout_batch_size=8     8 prompts x 8 samples per rollout ...
    rollout.global_batch_size=64     ... one optimizer step per rollout
    checkpoint.save_interval=5       saves after rollouts 4, 9, 14, 19
    eval.interval=7                  evals after rollouts 6 and 13, inside the timed window
    eval.before_train=false          no eval before rollout 0 (it would count as start-up)

Threads: `--threads` (default 1) is given to the flow's engine as `$KIMI_GRPO_THREADS` and set for
the bare loop, whose engine calls run on one worker thread with `OMP_NUM_THREADS=1` in the
environment, as in the Ray actor. One thread by default because a 2-thread OpenMP team is several
times slower, and erratic, whenever another process takes a core, which made the two sides
incomparable on a shared 2-core machine.

Timing. `flow_s` and `bare_s` run from the start of the first rollout to the end of the last one,
everything between included (per-rollout tasks, Ray calls, MLflow logging, manifest reads,
saves, evals). The flow's window comes from what the run records: each rollout's MLflow metrics
carry `perf/step_time` (the orchestrator's wall seconds of that rollout's step) and are logged at
its end, so the first start is `timestamp - step_time` of the first rollout and the last end is
the timestamp of the last. `engine_s` is the engine's own sampling + training time in the window
(its `perf/rollout_time` + `perf/train_time`), which separates a slower engine from orchestration.
The CPU table (`ProcessSampler`) shows what each process of a side used inside its window: the
engine's process (the actor, or the bare loop's process) with its minor page faults and involuntary
context switches, and, in the flow, the Prefect server, the CLI (Prefect client, MLflow logging), the
Ray head's processes and other workers. An engine that is slower inside the flow with as much CPU
but many more involuntary switches was waiting for a core, not working more.
`startup_s` is the flow's one-time start-up: process start of `kimi-grpo run` to the first
rollout's start (Python imports, Prefect, the data / model / conversion stages, the Ray head, the
engine actor with its model load, the MLflow run); its breakdown comes from the arrival times of
the CLI's console lines and the durations they report, and a second table gives the CPU seconds
each process used in it (start-up on 2 cores is bound by the sum of those: a phase that waits is
usually waiting for a core). Set up beforehand and not timed: the base
model and its converted reference (made once per base dir, like every later run in a base dir
finds them: the flow's `acquire_model` and `convert_checkpoint` stages only check their content) and,
unless `--fresh-databases`, the Prefect and MLflow databases, which only a first run on a machine
or base dir creates (their times are printed).

    python benchmarks/orchestration_overhead.py [--rollouts 20] [--threads 1] [--workdir DIR]
        [--fresh-databases] [--verbose] [--set key=value ...]

Last line: `RESULT flow_s=<a> bare_s=<b> ratio=<a/b> startup_s=<c>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
# The engine actor runs in a Ray worker, where Ray sets OMP_NUM_THREADS=1 (a 1-CPU actor) before the
# session sets torch's thread count: the bare loop gets the same settings.
os.environ["OMP_NUM_THREADS"] = "1"

from kimi_core import stages
from kimi_core.engines.base import EvalResult, RolloutResult
from kimi_core.recipe import Recipe, load_recipe, plan_run
from kimi_core.run_state import RunPaths
from kimi_core.runtime.loop import RolloutLoop
from kimi_core.runtime.manifest import Manifest
from kimi_core.runtime.recording import STEP_TIME_METRIC
from kimi_core.runtime.session import THREADS_ENV

RECIPE = "configs/local.yaml"
ENGINE_METRICS = ("perf/rollout_time", "perf/train_time")
EVAL_METRIC = "perf/eval_time"  # the engine's own seconds in one eval
OVERRIDES = [
    "model.warmup.steps=20",
    "rollout.rollout_batch_size=8",
    "rollout.global_batch_size=64",
    "checkpoint.save_interval=5",
    "eval.interval=7",
    "eval.before_train=false",
]


@dataclass
class Side:
    """One side's figures: rollouts, their window in seconds, its start-up and the engine's own time."""

    name: str
    rollouts: int
    rollout_s: float
    startup_s: float
    engine_s: float  # the engine's own sampling + training seconds (its perf/ metrics), saves and evals excluded
    eval_s: float = 0.0  # the engine's own seconds in the evals of the window
    notes: dict[str, float] = field(default_factory=dict)
    window: tuple[float, float] = (0.0, 0.0)  # (first rollout start, last rollout end), epoch seconds
    cpu: dict[str, float] = field(default_factory=dict)  # `ProcessSampler.window_table` of the window
    startup_cpu: dict[str, float] = field(default_factory=dict)  # the same for the start-up (flow only)


# ---- where the CPU goes -----------------------------------------------------------------------
SAMPLE_INTERVAL_S = 0.25  # `ProcessSampler`'s period
def _process_kind(cmdline: str) -> str:
    """The row of the CPU table a process counts in (its command line when first seen)."""
    if "uvicorn" in cmdline and "prefect" in cmdline:
        return "Prefect server"
    if "flows.cli" in cmdline:
        return "flow CLI"
    if "--bare" in cmdline:
        return "engine"
    if "default_worker" in cmdline or cmdline.startswith("ray::"):
        return "Ray workers"
    if "ray" in cmdline:
        return "Ray head processes"
    return "other"


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(minor page faults, involuntary context switches) of all threads of `pid` (Linux /proc), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()  # the process's faults, all threads
        statuses = [task.read_text() for task in Path(f"/proc/{pid}/task").glob("*/status")]  # per thread
    except OSError:
        return None
    minflt = int(stat[stat.rindex(")") + 2:].split()[7])
    switches = sum(int(line.split()[1]) for status in statuses for line in status.splitlines()
                   if line.startswith("nonvoluntary_ctxt_switches"))
    return minflt, switches


class ProcessSampler:
    """Samples CPU seconds (and, on Linux, minor faults and involuntary context switches) of a process
    and all its descendants every `interval_s` on a thread, so that what each used inside a time
    window can be read afterwards: the flow's window shows whether a slower engine was starved
    (preempted by the other processes) or did more work, and what the orchestration itself costs.
    Counters are cumulative, so a window's figure is the difference of the samples that bracket it
    (a process first seen inside the window counts from 0). The sampling costs ~1% of a core; both
    sides are sampled alike."""

    def __init__(self, root_pid: int, *, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(root_pid)
        self.interval_s = interval_s
        self.series: dict[int, tuple[str, list[tuple[float, float, int, int]]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)
        self.sample()

    def sample(self) -> None:
        psutil = self._psutil
        now = time.time()
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                times = proc.cpu_times()
                if proc.pid not in self.series:
                    self.series[proc.pid] = (_process_kind(" ".join(proc.cmdline())), [])
            except psutil.Error:
                continue
            faults, switches = _proc_stat(proc.pid) or (0, 0)
            self.series[proc.pid][1].append((now, times.user + times.system, faults, switches))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def window_table(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds by process kind inside [start, end], plus the engine's faults and switches.
        The engine is the bare loop's process, or in the flow the busiest Ray worker (the actor)."""
        used: list[tuple[str, tuple[float, int, int]]] = []  # (kind, (cpu s, faults, switches)) per process
        for kind, points in self.series.values():
            inside = [p for p in points if p[0] <= end]
            if not inside or points[-1][0] < start:
                continue
            first = next((p for p in reversed(points) if p[0] <= start), (start, 0.0, 0, 0))
            last = inside[-1]
            used.append((kind, (last[1] - first[1], last[2] - first[2], last[3] - first[3])))
        engines = [u for kind, u in used if kind == "engine"] or [u for kind, u in used if kind == "Ray workers"]
        engine = max(engines, default=(0.0, 0, 0))
        out: dict[str, float] = {}
        for kind, u in used:
            if u is not engine:
                out[kind] = out.get(kind, 0.0) + u[0]
        return {"engine": engine[0], "engine minor faults": engine[1], "engine involuntary switches": engine[2],
                **{kind: out[kind] for kind in sorted(out)}}


# ---- the flow -------------------------------------------------------------------------------
def _pump(stream: IO[str], lines: list[tuple[float, str]], echo: bool) -> None:
    """Collect the lines of `stream` with their arrival times."""
    for line in stream:
        lines.append((time.time(), line.rstrip("\n")))
        if echo:
            print(f"  | {line.rstrip()}", file=sys.stderr, flush=True)


def flow_env(workdir: Path, threads: int) -> dict[str, str]:
    """Environment of the flow's process: its own Prefect home, MLflow to the default sqlite file."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_HOME": str(workdir / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_TELEMETRY": "false",
           THREADS_ENV: str(threads)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def create_databases(env: dict[str, str], base_dir: Path) -> dict[str, float]:
    """The once-per-machine / once-per-base-dir set-up every later run finds in place: the Prefect
    database (schema migrations) and the base dir's MLflow database. Returns seconds for each."""
    from mlflow import MlflowClient

    took = {}
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("prefect")), "server", "database", "upgrade", "-y"], env=env,
                   check=True, capture_output=True, text=True)
    took["Prefect database"] = time.perf_counter() - started
    started = time.perf_counter()
    MlflowClient(f"sqlite:///{RunPaths.of(base_dir, 'flow').mlflow_db}").search_experiments()  # as the flow resolves it
    took["MLflow database"] = time.perf_counter() - started
    return took


def run_flow(args: argparse.Namespace, overrides: list[str], base_dir: Path, env: dict[str, str]) -> Side:
    """`kimi-grpo run` in a subprocess, timed from what the run recorded."""
    cmd = [sys.executable, "-m", "flows.cli", "run", RECIPE, "--run-name", "flow", "--base-dir", str(base_dir),
           "--num-rollout", str(args.rollouts)]
    for item in overrides:
        cmd += ["--set", item]
    lines: list[tuple[float, str]] = []
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = ProcessSampler(proc.pid)
    pumps = [threading.Thread(target=_pump, args=(stream, lines, args.verbose), daemon=True)
             for stream in (proc.stdout, proc.stderr)]
    for pump in pumps:
        pump.start()
    code = proc.wait()
    sampler.stop()
    for pump in pumps:
        pump.join()
    if code != 0:
        sys.stderr.write("\n".join(line for _, line in lines[-60:]) + "\n")
        raise SystemExit(f"the flow failed with exit code {code}")
    first_start, last_end, n, engine_s, eval_s = _flow_window(base_dir, "flow")
    side = Side("flow", n, last_end - first_start, first_start - started, engine_s, eval_s,
                window=(first_start, last_end))
    side.notes = _startup_breakdown(lines, started, first_start)
    side.cpu = sampler.window_table(first_start, last_end)
    side.startup_cpu = sampler.window_table(started, first_start)
    return side


def _flow_window(base_dir: Path, run_name: str) -> tuple[float, float, int, float, float]:
    """(first rollout start, last rollout end, rollouts, engine seconds, eval seconds) from the run's
    MLflow metrics: each rollout's `perf/step_time` point is logged at its end."""
    from mlflow import MlflowClient

    manifest = Manifest.load(RunPaths.of(base_dir, run_name))
    client = MlflowClient(manifest.mlflow_tracking_uri)
    run_id = manifest.mlflow_run_id
    points = sorted(client.get_metric_history(run_id, STEP_TIME_METRIC), key=lambda m: m.step)
    if not points:
        raise SystemExit(f"the flow's MLflow run has no {STEP_TIME_METRIC} points")
    engine_s = sum(m.value for key in ENGINE_METRICS for m in client.get_metric_history(run_id, key))
    eval_s = sum(m.value for m in client.get_metric_history(run_id, EVAL_METRIC) if m.step < points[-1].step)
    return points[0].timestamp / 1000 - points[0].value, points[-1].timestamp / 1000, len(points), engine_s, eval_s


_DONE_LINE = re.compile(r"^(?:stage (\w+): (?:done|inputs unchanged, earlier output reused)|ray head at \S+: started|engine session \S+ at rollout \d+) in ([\d.]+) s")


def _startup_breakdown(lines: list[tuple[float, str]], started: float, first_start: float) -> dict[str, float]:
    """Start-up phases from when the CLI's console lines arrived and the durations they report."""
    cli = next((when for when, line in lines if line.startswith("run ") and " of " in line), None)
    spans: dict[str, tuple[float, float]] = {}  # phase -> (start, end)
    for when, line in lines:
        if (m := _DONE_LINE.match(line)) is not None:
            name = f"stage {m.group(1)}" if m.group(1) else ("Ray head" if line.startswith("ray") else "engine session")
            spans.setdefault(name, (when - float(m.group(2)), when))
    if cli is None or "engine session" not in spans:
        return {}
    session = spans.pop("engine session")
    head = spans.pop("Ray head", None)
    out = {"python imports, recipe check": cli - started}
    if head is not None:  # started beside the stages, off the critical path while they take longer
        out["(Ray head started, after the process start)"] = head[0] - started
        out["(Ray head, in parallel with the stages)"] = head[1] - head[0]
    if spans:
        first, last = min(s for s, _ in spans.values()), max(e for _, e in spans.values())
        out["Prefect start, flow run setup"] = first - cli
        out["stages (one after another)"] = last - first
        out.update({f"  {name}": end - begin for name, (begin, end) in spans.items()})
        out["between (Prefect tasks; the head if it is later)"] = session[0] - last
    out["engine actor + model load | MLflow run"] = session[1] - session[0]
    out["to the first rollout"] = first_start - session[1]
    return out


# ---- the bare loop --------------------------------------------------------------------------
BARE_LINE = "BARE "


def run_bare_process(args: argparse.Namespace, workdir: Path, run_name: str) -> Side:
    """`bare_side` in a fresh process (this script with `--bare`); its `Side` comes back as JSON."""
    cmd = [sys.executable, __file__, "--bare", run_name, "--workdir", str(workdir), "--rollouts", str(args.rollouts),
           "--threads", str(args.threads), *(f"--set={item}" for item in args.overrides)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = ProcessSampler(proc.pid)
    stdout, stderr = proc.communicate()
    sampler.stop()
    lines = [line for line in stdout.splitlines() if line.startswith(BARE_LINE)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(stdout[-3000:] + stderr[-3000:])
        raise SystemExit(f"the bare loop {run_name} failed with exit code {proc.returncode}")
    fields = json.loads(lines[-1].removeprefix(BARE_LINE))
    side = Side(**{**fields, "window": tuple(fields["window"])})
    side.cpu = sampler.window_table(*side.window)
    return side


def bare_side(recipe: Recipe, base_dir: Path, run_name: str, *, threads: int) -> Side:
    """`LocalEngine` driven directly: train, save when due, eval when due.

    The engine runs on one worker thread, with torch's thread count set on the main thread, as in
    the engine actor (its `EngineSession` runs every engine call on a thread of its own). This matters: torch's
    OpenMP settings are per thread, and on a loaded 2-core machine a 2-thread OpenMP team on the
    main thread is several times slower than what the actor runs.
    """
    import torch

    torch.set_num_threads(threads)
    paths = RunPaths.of(base_dir, run_name).ensure()
    data = stages.prepare_data(recipe, paths)
    model = stages.acquire_model(recipe, paths)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_bare_loop, recipe, paths, data, model).result()


class BareRecorder:
    """The loop's recorder on the bare side: the timing window and the engine's own seconds."""

    def __init__(self) -> None:
        self.first_start = time.time()
        self.last_end, self.engine_s, self.rollouts = self.first_start, 0.0, 0
        self.eval_time: dict[int, float] = {}  # rollout id -> the engine's seconds in the eval after it

    def rollout(self, result: RolloutResult, *, step_time: float, log_metrics: bool) -> RolloutResult:
        self.engine_s += sum(result.metrics[key] for key in ENGINE_METRICS)
        self.rollouts += 1
        self.last_end = time.time()
        return result

    def eval(self, result: EvalResult, *, log_metrics: bool) -> EvalResult:
        self.eval_time[result.rollout_id] = result.metrics.get(EVAL_METRIC, 0.0)  # 0 from an engine without it
        return result


def _bare_loop(recipe: Recipe, paths: RunPaths, data: dict[str, Any], model: dict[str, Any]) -> Side:
    """The one rollout loop (`kimi_core.runtime.loop`) over a `LocalEngine` in this process: the same
    schedule of saves and evals as the flow, without Prefect, Ray, MLflow or the manifest."""
    from kimi_core.engines.local import LocalEngine

    plan = plan_run(recipe)
    started = time.time()
    engine = LocalEngine(recipe, paths=paths, inputs=stages.engine_inputs(data, model))
    engine.start(None)
    recorder = BareRecorder()
    RolloutLoop(session=engine, plan=plan, recorder=recorder, start=0,
                pending_evals=RolloutLoop.evals_owed(plan, start=0, logged_evals=set())).run()
    engine.close()
    return Side(paths.run_name, recorder.rollouts, recorder.last_end - recorder.first_start,
                recorder.first_start - started, recorder.engine_s,
                sum(t for r, t in recorder.eval_time.items() if r < recorder.rollouts - 1),  # the window's evals
                window=(recorder.first_start, recorder.last_end))


def print_cpu_table(sides: list[Side]) -> None:
    """What each side's processes used inside its rollout window (`ProcessSampler`)."""
    rows = list(dict.fromkeys(key for side in sides for key in side.cpu))
    print(f"\nCPU inside the rollout window, by process (seconds, sampled every {SAMPLE_INTERVAL_S} s):")
    print(f"  {'':<30}" + "".join(f"{side.name:>13}" for side in sides))
    for row in [*rows, "total CPU s", "wall s"]:
        cells = []
        for side in sides:
            if row == "total CPU s":
                value: float | None = sum(v for k, v in side.cpu.items() if not k.startswith("engine ")) or None
            elif row == "wall s":
                value = side.rollout_s
            else:
                value = side.cpu.get(row)
            integer = row.startswith("engine ")
            cells.append(f"{'-':>13}" if value is None else f"{value:>13.0f}" if integer else f"{value:>13.2f}")
        print(f"  {row:<30}" + "".join(cells))
    print("  (engine: the engine actor's process in the flow, the bare loop's process; its minor page faults and "
          "involuntary context switches, all threads)")


# ---- main -----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help=f"torch threads of the engine on both sides (${THREADS_ENV} for the flow)")
    parser.add_argument("--workdir", default=None, help="base dir, Prefect home; default: a new temp dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fresh-databases", action="store_true",
                        help="let the flow create the Prefect and MLflow databases (a first run) inside its start-up")
    parser.add_argument("--verbose", action="store_true", help="echo the flow's console")
    parser.add_argument("--bare", metavar="RUN_NAME", help=argparse.SUPPRESS)  # one bare loop (run_bare_process)
    args = parser.parse_args()
    if args.rollouts < 20:
        parser.error("--rollouts must be at least 20")
    overrides = [*OVERRIDES, *args.overrides]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="orchestration-overhead-")).resolve()
    base_dir = workdir / "base"
    recipe = load_recipe(RECIPE, overrides=[*overrides, f"rollout.num_rollout={args.rollouts}"], base_dir=str(base_dir))
    if args.bare:
        side = bare_side(recipe, base_dir, args.bare, threads=args.threads)
        print(BARE_LINE + json.dumps(dataclasses.asdict(side)), flush=True)
        return
    for name in ("flow", "bare-before", "bare-after"):
        if (base_dir / "runs" / name).exists():
            raise SystemExit(f"{base_dir / 'runs' / name} exists: use a fresh --workdir")
    plan = plan_run(recipe)
    print(f"recipe {RECIPE}, {args.rollouts} rollouts, {args.threads} torch thread(s), overrides: {' '.join(overrides)}")
    print(f"saves after {list(plan.save_after)}; evals after {[r for r in plan.eval_after if r < plan.num_rollout - 1]} "
          f"(both sides; none before training); workdir {workdir}")

    import torch  # here: after OMP_NUM_THREADS is set above

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = stages.acquire_model(recipe, RunPaths.of(base_dir, "bare-before").ensure())
    print(f"base model: {'built' if model['built'] else 'cached'} in {time.perf_counter() - started:.1f} s (not timed)",
          flush=True)
    started = time.perf_counter()
    converted = stages.convert_checkpoint(recipe, RunPaths.of(base_dir, "bare-before"),
                                          hf_checkpoint=model["hf_checkpoint"])
    print(f"reference conversion: {'cached' if converted['cached'] else 'done'} in "
          f"{time.perf_counter() - started:.1f} s (not timed; a first run in a base dir pays it)", flush=True)
    env = flow_env(workdir, args.threads)
    if not args.fresh_databases:
        took = create_databases(env, base_dir)
        print("created beforehand (not timed; a first run on a machine / base dir pays them): "
              + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in took.items()), flush=True)

    bares = [run_bare_process(args, workdir, "bare-before")]
    print(f"bare loop (before the flow): {bares[0].rollout_s:.1f} s", flush=True)
    flow = run_flow(args, overrides, base_dir, env)
    print(f"flow: {flow.rollout_s:.1f} s", flush=True)
    bares.append(run_bare_process(args, workdir, "bare-after"))
    print(f"bare loop (after the flow): {bares[1].rollout_s:.1f} s", flush=True)
    bare = Side("bare", bares[0].rollouts,
                *(sum(getattr(b, f) for b in bares) / 2 for f in ("rollout_s", "startup_s", "engine_s", "eval_s")))

    print(f"\n{'side':<12} {'rollouts':>8} {'rollout_s':>10} {'s/rollout':>10} {'engine_s':>9} {'eval_s':>7} "
          f"{'startup_s':>10}")
    for side in (flow, *bares, bare):
        print(f"{side.name:<12} {side.rollouts:>8d} {side.rollout_s:>10.2f} {side.rollout_s / side.rollouts:>10.3f} "
              f"{side.engine_s:>9.2f} {side.eval_s:>7.2f} {side.startup_s:>10.1f}")
    print("(bare = mean of the two bare loops; engine_s = the engine's sampling + training time inside the window, "
          "eval_s = the engine's own time in the window's evals)")
    print(f"\norchestration overhead: {(flow.rollout_s - bare.rollout_s) / flow.rollouts * 1000:.0f} ms per rollout "
          f"({(flow.rollout_s - flow.engine_s - bare.rollout_s + bare.engine_s) / flow.rollouts * 1000:.0f} ms "
          "outside the engine's own sampling and training)")
    print_cpu_table([flow, *bares])
    print("flow start-up (process start -> first rollout):")
    for phase, seconds in flow.notes.items():
        print(f"  {phase:<42} {seconds:>6.1f} s")
    print(f"CPU in the start-up, by process ({flow.startup_s:.1f} s wall, 2 x that on 2 cores at most):")
    for kind, seconds in flow.startup_cpu.items():
        if not kind.startswith("engine "):
            print(f"  {'engine actor' if kind == 'engine' else kind:<42} {seconds:>6.1f} s")
    print(f"  {'total':<42} {sum(v for k, v in flow.startup_cpu.items() if not k.startswith('engine ')):>6.1f} s")
    print(f"RESULT flow_s={flow.rollout_s:.2f} bare_s={bare.rollout_s:.2f} ratio={flow.rollout_s / bare.rollout_s:.3f} "
          f"startup_s={flow.startup_s:.1f}")


if __name__ == "__main__":
    main()
