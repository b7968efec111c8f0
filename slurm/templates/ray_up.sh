# Ray on Slurm, rendered by slurm.render_ray_up (do not edit by hand).
# The head runs on the first node, one worker on each other node, each in its own srun step
# with an explicit --num-gpus. Ready = every node registered and all GPUs visible; then the
# payload runs on the head node. If any step ends, the job tears down. Processes are stopped
# through Slurm (signals to this job's own steps), never by name: `ray stop` is not used
# because it matches every Ray process on the host.
set -euo pipefail
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501)); then
    echo "ray-up: bash >= 5.1 is needed (wait -n -p)" >&2
    exit 2
fi

{{extra_env}}# 1 is Ray's default on Linux; 0 would make `ray start --address` refuse to join the head.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
export RAY_USAGE_STATS_ENABLED=0
# Ray turns token auth on for a head whenever a token file exists (~/.ray/auth_token); nodes and
# drivers must then all hold it. Off unless the site opts in by exporting RAY_AUTH_MODE=token.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

START_TIME=$EPOCHREALTIME
PYTHON={{python}}
RAY_TMP={{temp_dir}}
GPUS_PER_NODE={{gpus_per_node}}
CPUS_PER_NODE={{cpus_per_node}}
READY_TIMEOUT_S={{readiness_timeout_s}}
STOP_GRACE_S={{stop_grace_s}}
GCS_PORT={{gcs_port}}
DASHBOARD_PORT={{dashboard_port}}
CLIENT_SERVER_PORT={{client_server_port}}
NODE_PORT_BASE={{node_port_base}}
MIN_WORKER_PORT={{min_worker_port}}
MAX_WORKER_PORT={{max_worker_port}}
NODE_PORT_STRIDE={{node_port_stride}}
STEP_ARGS=(--overlap --nodes=1 --ntasks=1{{container_args}})
GPU_ARGS=({{gpu_args}})
PAYLOAD={{payload}}

log() { echo "[ray-up $(date +%H:%M:%S)] $*"; }
node_ip() { getent ahostsv4 "$1" | awk 'NR == 1 { print $1 }'; }

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE=${NODES[0]}
HEAD_IP=$(node_ip "$HEAD_NODE")
export RAY_ADDRESS=$HEAD_IP:$GCS_PORT
declare -A STEP_NODE=()
CURRENT_PID=""
for node in "${NODES[@]}"; do
    # Ray's unix sockets live under <temp dir>/<node>/session_<timestamp>_<pid>/sockets/.
    if ((${#RAY_TMP} + ${#node} + 72 > 107)); then
        log "temp dir $RAY_TMP/$node is too long for Ray's unix socket paths (107 bytes)"
        exit 2
    fi
done

read -r -d '' READY_PY <<'EOF' || true
import sys, time
import ray

start, timeout_s, want_gpus, nodes = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
deadline = time.monotonic() + timeout_s
while True:
    try:
        ray.init(logging_level="ERROR")
        break
    except Exception as error:
        if time.monotonic() > deadline:
            sys.exit(f"ray-up: no Ray head answered within {timeout_s:.0f}s: {error}")
        time.sleep(2)
while True:
    alive = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    seen = {key[len("slurm_node_"):] for res in alive for key in res if key.startswith("slurm_node_")}
    gpus = sum(res.get("GPU", 0) for res in alive)
    missing = [node for node in nodes if node not in seen]
    if not missing and gpus >= want_gpus:
        print(f"ray-up: ready after {time.time() - start:.1f}s: {len(nodes)} nodes, {gpus:g} GPUs", flush=True)
        break
    if time.monotonic() > deadline:
        sys.exit(f"ray-up: not ready after {timeout_s:.0f}s: nodes not registered: {' '.join(missing) or 'none'} (GPUs {gpus:g}/{want_gpus:g})")
    time.sleep(1)
EOF

# start_ray_node INDEX NODE [FLAGS...]: a Ray node in its own step, ports shifted by INDEX * stride.
start_ray_node() {
    local off=$(($1 * NODE_PORT_STRIDE)) node=$2
    shift 2
    srun "${STEP_ARGS[@]}" "${GPU_ARGS[@]}" -w "$node" --cpus-per-task="$CPUS_PER_NODE" \
        "$PYTHON" -m ray.scripts.scripts start --block --disable-usage-stats \
        --node-ip-address="$(node_ip "$node")" --temp-dir="$RAY_TMP/$node" \
        --num-gpus="$GPUS_PER_NODE" --num-cpus="$CPUS_PER_NODE" \
        --resources="{\"slurm_node_$node\": 1}" \
        --node-manager-port=$((NODE_PORT_BASE + off)) \
        --object-manager-port=$((NODE_PORT_BASE + off + 1)) \
        --metrics-export-port=$((NODE_PORT_BASE + off + 2)) \
        --dashboard-agent-grpc-port=$((NODE_PORT_BASE + off + 3)) \
        --dashboard-agent-listen-port=$((NODE_PORT_BASE + off + 4)) \
        --runtime-env-agent-port=$((NODE_PORT_BASE + off + 5)) \
        --min-worker-port=$((MIN_WORKER_PORT + off)) --max-worker-port=$((MAX_WORKER_PORT + off)) \
        "$@" &
    STEP_NODE[$!]=$node
}

# on_head LABEL CMD...: run CMD on the head node; fail naming the node if a Ray step ends first.
on_head() {
    local label=$1 finished rc
    shift
    srun "${STEP_ARGS[@]}" -w "$HEAD_NODE" "$@" &
    CURRENT_PID=$!
    while true; do
        finished="" rc=0
        wait -n -p finished "$CURRENT_PID" "${!STEP_NODE[@]}" || rc=$?
        [[ -n $finished ]] && break  # empty: a trapped signal interrupted the wait
    done
    if [[ $finished != "$CURRENT_PID" ]]; then
        log "the Ray step on ${STEP_NODE[$finished]} ended (exit $rc) during $label"
        return 1
    fi
    return "$rc"
}

teardown() {
    local rc=$? pid steps deadline=$((SECONDS + STOP_GRACE_S))
    trap - EXIT TERM INT
    log "tearing down (exit status $rc)"
    for pid in "${!STEP_NODE[@]}" $CURRENT_PID; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${!STEP_NODE[@]}" $CURRENT_PID; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 1; done
    done
    steps=$(squeue -h -s -j "$SLURM_JOB_ID" -o %i | grep -v -e '\.batch$' -e '\.extern$' || true)
    if [[ -n $steps ]]; then
        log "cancelling leftover steps: $steps"
        scancel $steps || true
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'exit 143' TERM INT
trap 'log "SIGUSR1: the time limit is near"; [[ -z $CURRENT_PID ]] || kill -USR1 "$CURRENT_PID"' USR1

log "job $SLURM_JOB_ID: head $HEAD_NODE ($RAY_ADDRESS), ${#NODES[@]} nodes x $GPUS_PER_NODE GPUs"
start_ray_node 0 "$HEAD_NODE" --head --port="$GCS_PORT" --dashboard-host="$HEAD_IP" \
    --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$CLIENT_SERVER_PORT"
for ((i = 1; i < ${#NODES[@]}; i++)); do
    start_ray_node "$i" "${NODES[$i]}" --address="$RAY_ADDRESS"
done
on_head readiness "$PYTHON" -c "$READY_PY" "$START_TIME" "$READY_TIMEOUT_S" \
    "$((GPUS_PER_NODE * ${#NODES[@]}))" "${NODES[@]}"
on_head payload bash -c "$PAYLOAD"
log "payload finished"
