#!/usr/bin/env bash
# Stop the local SLURM cluster started by .ci/slurm-up.sh: slurmd, slurmctld, then munged, each by its
# pid file (never by process name, so unrelated processes are left alone). Idempotent: a daemon that
# is not running is skipped. Packages, configuration and job state stay in place for the next start.
set -euo pipefail

STOP_TIMEOUT_S=${SLURM_DOWN_TIMEOUT_S:-15}

stop() {
    local name=$1 pidfile=$2 pid
    if [[ ! -s $pidfile ]]; then
        return 0
    fi
    pid=$(cat "$pidfile")
    if ! kill -0 "$pid" 2>/dev/null; then
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid"
    local deadline=$((SECONDS + STOP_TIMEOUT_S))
    while kill -0 "$pid" 2>/dev/null; do
        if (( SECONDS >= deadline )); then
            echo "slurm-down: $name (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT_S}s; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    rm -f "$pidfile"
    echo "slurm-down: stopped $name (pid $pid)"
}

stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
stop munged /run/munge/munged.pid
