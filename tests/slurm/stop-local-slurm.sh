#!/usr/bin/env bash
# Stop the local test cluster started by tests/slurm/start-local-slurm.sh.
#
# Cancels every job, waits (bounded) for an empty queue, then stops the daemons it started by
# the pids in their pid files, in the order slurmd(s), slurmctld, slurmdbd, mariadbd, munged.
# slurmstepd processes left by jobs (a program that ignored SIGTERM) are found through the
# slurmd spool dirs' parentage and killed by pid. Never matches processes by name.
# The state dir is kept (logs); remove it by hand for a fresh database.
set -euo pipefail

STATE=${KIMI_SLURM_STATE:-/tmp/kimi-slurm}
QUEUE_TIMEOUT_S=${KIMI_SLURM_QUEUE_TIMEOUT_S:-30}
export SLURM_CONF=$STATE/etc/slurm.conf

log() { printf '[stop-local-slurm] %s\n' "$*"; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_by_pidfile PIDFILE NAME: SIGTERM, wait up to 15 s, then SIGKILL.
stop_by_pidfile() {
    local pidfile=$1 name=$2 pid i
    alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 150); do
        kill -0 "$pid" 2>/dev/null || { log "stopped $name (pid $pid)"; return 0; }
        sleep 0.1
    done
    log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# Pids of every slurmstepd of this cluster: processes whose working directory or command line
# refers to the state dir and whose executable is slurmstepd (identified by /proc/PID/exe).
leftover_stepds() {
    local d pid exe
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        exe=$(readlink "$d/exe" 2>/dev/null) || continue
        [[ $exe == */slurmstepd ]] || continue
        if tr '\0' '\n' <"$d/environ" 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF" \
            || [[ $(readlink "$d/cwd" 2>/dev/null) == "$STATE"/* ]]; then
            echo "$pid"
        fi
    done
}

if [[ ! -f $SLURM_CONF ]]; then
    log "no cluster state at $STATE; nothing to stop"
    exit 0
fi

if alive "$STATE/run/slurmctld.pid"; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    # shellcheck disable=SC2086
    [[ -z $jobs ]] || scancel --quiet $jobs 2>/dev/null || true
    deadline=$((SECONDS + QUEUE_TIMEOUT_S))
    while [[ -n $(squeue -h -o %i 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.5; done
    left=$(squeue -h -o '%i %T' 2>/dev/null || true)
    [[ -z $left ]] || log "jobs still in the queue after ${QUEUE_TIMEOUT_S}s: $left"
fi

for node in n1 n2; do stop_by_pidfile "$STATE/run/slurmd-$node.pid" "slurmd $node"; done
for pid in $(leftover_stepds); do
    log "killing leftover slurmstepd pid $pid"
    kill -KILL "$pid" 2>/dev/null || true
done
stop_by_pidfile "$STATE/run/slurmctld.pid" slurmctld
stop_by_pidfile "$STATE/run/slurmdbd.pid" slurmdbd
stop_by_pidfile "$STATE/mysql/mariadbd.pid" mariadbd
stop_by_pidfile "$STATE/munge/munged.pid" munged
if [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$STATE/etc/slurm.conf" ]]; then
    rm -f /etc/slurm/slurm.conf
fi
log "local Slurm cluster stopped (state kept in $STATE)"
