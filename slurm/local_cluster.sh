#!/usr/bin/env bash
# A one-machine SLURM cluster (munged, slurmctld, slurmd from Debian's slurm-wlm and munge
# packages) for tests and demos; no systemd needed, everything lives in one state directory.
#
#   slurm/local_cluster.sh start [STATE_DIR]    # idempotent; waits until the node is idle
#   slurm/local_cluster.sh status [STATE_DIR]   # exit 0 when all three daemons run and sinfo answers
#   slurm/local_cluster.sh stop [STATE_DIR]     # stops the three daemons
#   slurm/local_cluster.sh env [STATE_DIR]      # prints `export SLURM_CONF=...` for the client commands
#
# STATE_DIR defaults to $LD_SLURM_DIR or /tmp/ld-slurm. The cluster's configuration is
# STATE_DIR/slurm.conf (nothing is written under /etc): client commands (sbatch, squeue, scontrol,
# ...) find it through SLURM_CONF, so run `eval "$(slurm/local_cluster.sh env)"` first. Jobs inherit
# SLURM_CONF from the sbatch environment, which is how Lightning's `scontrol requeue` finds it.
#
# One node, named after `hostname -s`, with `nproc --all` CPUs (LD_SLURM_CPUS overrides: slurmd then
# trusts the configured count), LD_SLURM_MEM_MB (default 2048) of memory and one partition
# `debug`. Ports LD_SLURM_PORT (slurmctld, default 6817) and LD_SLURM_PORT+1 (slurmd). Runs as
# root (SlurmUser=root): it needs root to start slurmd.
set -euo pipefail

cmd="${1:-status}"
state="${2:-${LD_SLURM_DIR:-/tmp/ld-slurm}}"
conf="$state/slurm.conf"
host="$(hostname -s)"
port="${LD_SLURM_PORT:-6817}"
cpus="${LD_SLURM_CPUS:-$(nproc --all)}"  # --all: nproc alone honours OMP_NUM_THREADS
mem="${LD_SLURM_MEM_MB:-2048}"
socket="$state/munge/munge.socket.2"
export SLURM_CONF="$conf"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

running() {  # running PIDFILE: the process named in the pid file is alive
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
    local overrides=""
    [[ -n "${LD_SLURM_CPUS:-}" ]] && overrides="SlurmdParameters=config_overrides"
    cat > "$conf.tmp" <<EOF
# Written by slurm/local_cluster.sh: a one-node cluster for tests and demos.
ClusterName=ld-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued batch job may start again cred_expire + 1 s after the requeue (default 120)
AuthInfo=socket=$socket,cred_expire=10
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# look at pending jobs every 2 s (default 60 / 30 s), so a requeued job starts once its begin time passes
SchedulerParameters=sched_interval=2,bf_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# requeue: allowed, and a job killed by it ends within seconds (tasks get SIGTERM, SIGKILL 3 s later)
JobRequeue=1
KillWait=3
ReturnToService=2
# finished jobs stay visible to scontrol/squeue for 10 minutes
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=300
Waittime=0
$overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$conf.tmp" "$conf"
}

start() {
    [[ $EUID -eq 0 ]] || die "start needs root (slurmd runs jobs as their users)"
    for bin in munged slurmctld slurmd sinfo; do
        command -v "$bin" >/dev/null || die "$bin not found: apt-get install -y slurm-wlm munge"
    done
    mkdir -p "$state/ctld" "$state/slurmd" "$state/munge"
    chmod 700 "$state/munge"
    if [[ ! -s "$state/munge/munge.key" ]]; then
        dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$state/munge/munge.key"
    fi
    if ! running "$state/munge/munged.pid"; then
        munged --force --key-file="$state/munge/munge.key" --socket="$socket" \
            --pid-file="$state/munge/munged.pid" --log-file="$state/munge/munged.log" \
            --seed-file="$state/munge/munged.seed" || die "munged failed: see $state/munge/munged.log"
    fi
    if ! running "$state/slurmctld.pid"; then
        write_conf
        slurmctld -f "$conf" || die "slurmctld failed: see $state/slurmctld.log"
    fi
    if ! running "$state/slurmd.pid"; then
        slurmd -f "$conf" || die "slurmd failed: see $state/slurmd.log"
    fi
    local node=""
    for _ in $(seq 1 60); do
        node="$(sinfo -h -n "$host" -o %t 2>/dev/null || true)"
        case "$node" in
            idle*|mix*|alloc*) echo "local SLURM cluster up: node $host ($node), SLURM_CONF=$conf"; return 0 ;;
            drain*|down*) scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node $host is not idle after 30 s (sinfo: '${node}'); see $state/slurmctld.log and $state/slurmd.log"
}

stop() {
    local pidfile pid pids=()
    for pidfile in "$state/slurmd.pid" "$state/slurmctld.pid" "$state/munge/munged.pid"; do
        if running "$pidfile"; then
            pid="$(cat "$pidfile")"
            kill "$pid" && pids+=("$pid")
        fi
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    done
    rm -f "$state/slurmd.pid" "$state/slurmctld.pid" "$state/munge/munged.pid"
    echo "local SLURM cluster in $state stopped"
}

status() {
    local ok=0 name pidfile
    for name in munged slurmctld slurmd; do
        pidfile="$state/$name.pid"; [[ $name == munged ]] && pidfile="$state/munge/munged.pid"
        if running "$pidfile"; then echo "$name: running (pid $(cat "$pidfile"))"; else echo "$name: stopped"; ok=1; fi
    done
    [[ $ok -eq 0 ]] && sinfo || ok=1
    return $ok
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$conf" ;;
    *) die "usage: $0 start|stop|status|env [STATE_DIR]" ;;
esac
