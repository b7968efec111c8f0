"""The process of a loopback Ray head: one Ray node on 127.0.0.1 with only the processes a local
run uses, checked from a driver's side, then blocked until SIGTERM (docs/design.md §9, the loopback head).

`ray start --head --block` would do the same through Ray's CLI, at a cost that matters on 2 cores:
the CLI imports Ray's cluster launcher and autoscaler before the first Ray process starts (about
1.9 s of imports where Ray's core needs 0.6 s), and it always starts a Ray Client server (about
1.5 CPU-seconds) that no driver here uses. This process starts the node the way that command does,
through `ray._private.node.Node` (Ray's private API: written for the Ray version pyproject.toml
pins), with: the GCS, the API server (Ray always starts it; no dashboard UI), the raylet and its
two agents; no Ray Client server, no log monitor (every driver connects with `log_to_driver=False`,
so nothing would read what it forwards; the workers still write their logs under the temp dir),
no autoscaler monitor (a one-node head never scales). Then it connects as a driver once, in this
process, and checks that the node is alive (what a fresh driver process used to check, without the
second interpreter), and prints `READY_LINE`.

Afterwards, as `ray start --block`: a Ray process that exits unexpectedly makes it stop the others
and exit 1; SIGTERM stops them (Ray's own handler until the driver check, which replaces it; this
file's own from then on). Run by its file path with `-P`, like the lease
watchdog: it needs Ray and nothing of this package. `ray_local.head_command` builds its argv.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import traceback

#: Printed once the node is up and a driver could connect to it.
READY_LINE = "kimi-grpo ray head ready"
#: Exit codes of a Ray process stopped on purpose (`ray start --block` treats them the same way).
STOPPED_CODES = {0, signal.SIGTERM, -signal.SIGTERM, 128 + signal.SIGTERM}
#: Exit code when the node started but a driver could not connect to it.
PROBE_FAILED = 3


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--temp-dir", required=True)
    for name in ("port", "num-cpus", "object-store-memory", "min-worker-port", "max-worker-port",
                 "dashboard-port", "dashboard-agent-listen-port"):
        parser.add_argument(f"--{name}", type=int, required=True)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import ray  # noqa: PLC0415 - after the arguments: a bad command line fails without Ray's import
    from ray._private.node import Node  # noqa: PLC0415
    from ray._private.parameter import RayParams  # noqa: PLC0415

    params = RayParams(
        node_ip_address="127.0.0.1", node_name="127.0.0.1", num_cpus=args.num_cpus, num_gpus=0,
        object_store_memory=args.object_store_memory, min_worker_port=args.min_worker_port,
        max_worker_port=args.max_worker_port, temp_dir=args.temp_dir, include_dashboard=False,
        dashboard_host="127.0.0.1", dashboard_port=args.dashboard_port,
        dashboard_agent_listen_port=args.dashboard_agent_listen_port,
        ray_client_server_port=None, no_monitor=True,
        include_log_monitor=False,  # type: ignore[arg-type]  # annotated str; `ray start` passes a bool
    )
    params.gcs_server_port = args.port
    # Ray's SIGTERM and atexit handlers stop the node's processes while it starts; the driver's
    # `ray.init` below replaces the SIGTERM one, so `_stop_on_sigterm` installs this file's own.
    node = Node(params, head=True, shutdown_at_exit=True, spawn_reaper=True)
    print(f"ray node started at 127.0.0.1:{args.port} (logs in {node.get_logs_dir_path()})",  # type: ignore[no-untyped-call]
          flush=True)
    try:
        ray.init(address=f"127.0.0.1:{args.port}", logging_level=logging.ERROR, log_to_driver=False)
        if not any(n["Alive"] for n in ray.nodes()):  # type: ignore[no-untyped-call]
            raise RuntimeError("the GCS lists no live node")
        ray.shutdown()
    except Exception:
        print(f"the node started but a driver cannot connect to it:\n{traceback.format_exc()}", flush=True)
        node.kill_all_processes(check_alive=False, allow_graceful=False)
        return PROBE_FAILED
    _stop_on_sigterm()
    print(READY_LINE, flush=True)
    try:
        while True:
            time.sleep(1)
            died = [(kind, process.returncode) for kind, process in node.dead_processes()  # type: ignore[no-untyped-call]
                    if process.returncode not in STOPPED_CODES]
            if died:
                print(f"Ray processes exited unexpectedly (kind, exit code): {died}; stopping the others",
                      flush=True)
                node.kill_all_processes(check_alive=False, allow_graceful=False)
                return 1
    except _Stopped:
        node.kill_all_processes(check_alive=False, allow_graceful=True)
        return 0


class _Stopped(Exception):
    """SIGTERM arrived: stop the node."""


def _stop_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop; a second SIGTERM must not cut it short
        raise _Stopped

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
