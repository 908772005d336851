#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (munged, slurmctld, slurmd) for the launcher tests.
#
# Why: tests/launch/test_slurm_cluster.py submits real sbatch jobs, requeues them and checks that
# training resumes; that needs a real scheduler, and CI machines have none. Run as root.
# Idempotent: installs packages only when missing, starts only the daemons that are not running,
# and returns once `sinfo` reports the node idle. Stop everything with .ci/slurm-down.sh.
#
# Refuses to overwrite an /etc/slurm/slurm.conf that this script did not write, so running it on a
# machine that belongs to a real cluster cannot clobber that cluster's configuration.
set -euo pipefail

MARKER="# written by llm4gen .ci/slurm-up.sh"
CONF=/etc/slurm/slurm.conf
READY_TIMEOUT_S=${SLURM_UP_TIMEOUT_S:-60}

if [[ $(id -u) -ne 0 ]]; then
    echo "slurm-up: must run as root (it installs packages and starts daemons); got uid $(id -u)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm-up: installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: the key authenticates every message between the SLURM daemons and the client commands.
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge

# slurm.conf: sized to this machine, since slurmd drains a node that has fewer CPUs or less memory
# than the configuration claims.
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
    echo "slurm-up: $CONF exists and was not written by this script; refusing to overwrite it" >&2
    exit 1
fi
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
new_conf=$(cat <<EOF
$MARKER
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
)
if [[ ! -e $CONF ]] || [[ "$(cat "$CONF")" != "$new_conf" ]]; then
    printf '%s\n' "$new_conf" > "$CONF"
fi

# A daemon counts as running when its pid file names a live process.
running() {
    local pidfile=$1
    [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

if ! running /run/munge/munged.pid; then
    runuser -u munge -- /usr/sbin/munged
fi
if ! running /run/slurmctld.pid; then
    slurmctld
fi
if ! running /run/slurmd.pid; then
    slurmd -N localhost
fi

deadline=$((SECONDS + READY_TIMEOUT_S))
while true; do
    state=$(sinfo -h -N -n localhost -o %t 2>/dev/null || true)
    case $state in
        idle|mix|alloc) break ;;
        drain*|down*|inval*|fail*)
            # ReturnToService=2 normally does this; a node left drained by an earlier run needs it here.
            scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
    esac
    if (( SECONDS >= deadline )); then
        echo "slurm-up: node not idle after ${READY_TIMEOUT_S}s (sinfo state: '${state:-no answer}')" >&2
        echo "slurm-up: see /var/log/slurm/slurmctld.log and /var/log/slurm/slurmd.log" >&2
        exit 1
    fi
    sleep 0.2
done
echo "slurm-up: node localhost is $state ($cpus CPUs, ${mem_mb} MB)"
