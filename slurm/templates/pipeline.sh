#SBATCH --open-mode=append
# The whole GRPO pipeline in one allocation, rendered by slurm.render_pipeline_sbatch (do not edit
# by hand). The fallback driver (no Prefect server) runs every stage and rollout in this job.
# SIGUSR1 (the deadline signal) or SIGTERM reaches this shell, which forwards SIGUSR1 to the
# driver: it saves at the next rollout boundary and exits 3; the job then requeues itself and
# the next attempt resumes from that checkpoint. Signals go to the driver's pid, never by name.
# --open-mode=append above keeps every attempt's output in the one log file (a requeued job
# would truncate it otherwise).
{{engine_note}}set -uo pipefail
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501)); then
    echo "pipeline: bash >= 5.1 is needed (wait -n -p)" >&2
    exit 2
fi

{{extra_env}}export KIMI_GRPO_BASE_DIR={{base_dir}}
{{workdir}}
REQUEUE_EXIT={{requeue_exit}}
PYTHON={{python}}
DRIVER_ARGS=({{driver_args}})

log() { echo "[pipeline $(date +%H:%M:%S)] $*"; }

# NVLink SHARP only where `nvidia-smi topo -m` shows NVLink (NV<n> entries); an explicit setting wins.
NVLINK_REFS=$(nvidia-smi topo -m 2>/dev/null | grep -Eo '(^|[[:space:]])NV[0-9]+' | wc -l)
if ((NVLINK_REFS > 0)); then NVLS_DETECTED=1; else NVLS_DETECTED=0; fi
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-$NVLS_DETECTED}

log "job ${SLURM_JOB_ID:-none}, restart count ${SLURM_RESTART_COUNT:-0}, on $(hostname):" \
    "$NVLINK_REFS NVLink entries, NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
{{launcher}}"$PYTHON" -m kimi_core.runtime.fallback "${DRIVER_ARGS[@]}" &
DRIVER=$!

forward() {
    log "$1: asking the driver (pid $DRIVER) to save at the next rollout boundary"
    kill -USR1 "$DRIVER" 2>/dev/null || true
}
trap 'forward SIGUSR1' USR1
trap 'forward SIGTERM' TERM

while true; do
    finished=""
    wait -n -p finished "$DRIVER"
    rc=$?
    [[ -n ${finished:-} ]] && break  # empty: a trapped signal interrupted the wait, the driver runs on
done

if ((rc == REQUEUE_EXIT)); then
    log "the driver saved at a rollout boundary and stopped: requeueing job $SLURM_JOB_ID"
    if ! out=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then
        log "scontrol requeue: $out (the job is already requeued or ending; nothing more to do)"
    fi
    exit 0
fi
log "the driver exited with status $rc"
exit "$rc"
