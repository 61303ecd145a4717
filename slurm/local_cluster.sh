#!/usr/bin/env bash
# A SLURM cluster on one machine (munged, slurmctld, slurmd from Debian's slurm-wlm and munge packages)
# for tests and demos; no systemd needed, everything lives in one state directory.
#
#   slurm/local_cluster.sh [--nodes N] start [STATE_DIR]  # idempotent; waits until every node is idle
#   slurm/local_cluster.sh status [STATE_DIR]   # exit 0 when all daemons run and sinfo answers
#   slurm/local_cluster.sh stop [STATE_DIR]     # stops the daemons (and removes the nodes' namespaces)
#   slurm/local_cluster.sh env [STATE_DIR]      # prints `export SLURM_CONF=...` for the client commands
#   slurm/local_cluster.sh exec [STATE_DIR] -- COMMAND [ARGS...]  # COMMAND where the clients reach slurmctld
#
# STATE_DIR defaults to $LD_SLURM_DIR or /tmp/ld-slurm. The cluster's configuration is
# STATE_DIR/slurm.conf (nothing is written under /etc): client commands (sbatch, squeue, scontrol,
# ...) find it through SLURM_CONF, so run `eval "$(slurm/local_cluster.sh env)"` first, or run them
# through `exec`. Jobs inherit SLURM_CONF from the sbatch environment, which is how Lightning's
# `scontrol requeue` finds it.
#
# One node (the default): named after `hostname -s`, address 127.0.0.1.
#
# N nodes (--nodes N, 2 <= N <= 16; or LD_SLURM_NODES): hosts of their own on this machine. Node i
# (node1 ... nodeN) is a slurmd in network namespace LD_SLURM_NETNS-n<i> (LD_SLURM_NETNS defaults to
# ldslurm) with interface ld0 at LD_SLURM_SUBNET.<i>/24 (default subnet 10.15.0), the nodes joined by
# a bridge in namespace LD_SLURM_NETNS-br: nothing is added to this machine's own network, and the
# nodes reach each other only over that bridge. slurm.conf gives each node its address (NodeAddr),
# so node names resolve through the cluster's configuration, not DNS or /etc/hosts. slurmctld runs
# on node1 (the head node): client commands must run in its namespace, which `exec` does (with
# SLURM_CONF and GLOO_SOCKET_IFNAME=ld0, so torch.distributed's gloo uses the nodes' network; both
# pass into the jobs); `env` prints both variables for a shell started by
# `nsenter --net=/run/netns/LD_SLURM_NETNS-n1 bash`. `stop` also ends whatever still runs in the
# namespaces and removes them. munged (a Unix socket) serves every node. The node count is kept in
# STATE_DIR/nodes: status, stop, env and exec need no --nodes.
#
# Each node has `nproc --all` CPUs (LD_SLURM_CPUS overrides: slurmd then trusts the configured
# count), LD_SLURM_MEM_MB (default 2048) of memory; one partition `debug` holds them all. Ports
# LD_SLURM_PORT (slurmctld, default 6817) and LD_SLURM_PORT+1 (slurmd). Runs as root
# (SlurmUser=root): it needs root to start slurmd (and, for N nodes, to make namespaces).
set -euo pipefail

die() { echo "local_cluster.sh: $*" >&2; exit 1; }
usage="usage: $0 [--nodes N] start|stop|status|env [STATE_DIR]  or  $0 exec [STATE_DIR] -- COMMAND [ARGS...]"

nodes_opt="${LD_SLURM_NODES:-}"
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) [[ $# -ge 2 ]] || die "--nodes needs a number; $usage"; nodes_opt="$2"; shift 2 ;;
        --nodes=*) nodes_opt="${1#--nodes=}"; shift ;;
        --) break ;;
        -*) die "unknown option $1; $usage" ;;
        *) args+=("$1"); shift ;;
    esac
done
cmd="${args[0]:-status}"
state="${args[1]:-${LD_SLURM_DIR:-/tmp/ld-slurm}}"
[[ ${#args[@]} -le 2 ]] || die "too many arguments (${args[*]}); $usage"
[[ $# -eq 0 || $cmd == exec ]] || die "'--' only goes with exec; $usage"
if [[ $cmd == exec ]]; then
    [[ $# -ge 2 ]] || die "exec needs a command after '--'; $usage"
    shift  # the '--'
fi
conf="$state/slurm.conf"
host="$(hostname -s)"
port="${LD_SLURM_PORT:-6817}"
cpus="${LD_SLURM_CPUS:-$(nproc --all)}"  # --all: nproc alone honours OMP_NUM_THREADS
mem="${LD_SLURM_MEM_MB:-2048}"
socket="$state/munge/munge.socket.2"
netns="${LD_SLURM_NETNS:-ldslurm}"
subnet="${LD_SLURM_SUBNET:-10.15.0}"
ifname=ld0
export SLURM_CONF="$conf"

# the node count: --nodes (or LD_SLURM_NODES) for start; for the rest, what the state directory's cluster has
recorded=""
[[ -s "$state/nodes" ]] && recorded="$(cat "$state/nodes")"
if [[ $cmd == start ]]; then nodes="${nodes_opt:-${recorded:-1}}"; else nodes="${recorded:-${nodes_opt:-1}}"; fi
[[ $nodes =~ ^[0-9]+$ && $nodes -ge 1 && $nodes -le 16 ]] || die "--nodes must be a number from 1 to 16, got '$nodes'"

running() {  # running PIDFILE: the process named in the pid file is alive
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_name() { if [[ $nodes -eq 1 ]]; then echo "$host"; else echo "node$1"; fi; }
node_ns() { echo "$netns-n$1"; }
slurmd_pidfile() { if [[ $nodes -eq 1 ]]; then echo "$state/slurmd.pid"; else echo "$state/slurmd-node$1.pid"; fi; }

in_ns() {  # in_ns NAMESPACE COMMAND...: COMMAND in that network namespace, all else as here. (Not
    # `ip netns exec`: its fresh /sys has no cgroup mounts, and slurmd will not start without them.)
    local ns="$1"; shift
    nsenter --net="/run/netns/$ns" -- "$@"
}

in_head() {  # in_head COMMAND...: run it where slurmctld is reachable (node1's namespace for N nodes)
    if [[ $nodes -eq 1 ]]; then "$@"; else in_ns "$(node_ns 1)" "$@"; fi
}

write_conf() {
    local overrides="" ctld_host nodelines="" partition i addr
    [[ -n "${LD_SLURM_CPUS:-}" ]] && overrides="SlurmdParameters=config_overrides"
    if [[ $nodes -eq 1 ]]; then
        ctld_host="$host(127.0.0.1)"
        nodelines="NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        partition="$host"
    else
        ctld_host="$host($subnet.1)"  # slurmctld checks that it runs on this host name; clients use the address
        for i in $(seq 1 "$nodes"); do
            addr="$subnet.$i"
            nodelines+="NodeName=node$i NodeAddr=$addr NodeHostname=node$i CPUs=$cpus RealMemory=$mem State=UNKNOWN"$'\n'
        done
        partition="node[1-$nodes]"
    fi
    # one slurmd per node on this machine: the per-node paths carry the node name (%n)
    local d_spool="$state/slurmd" d_pid="$state/slurmd.pid" d_log="$state/slurmd.log"
    if [[ $nodes -gt 1 ]]; then
        d_spool="$state/slurmd-%n" d_pid="$state/slurmd-%n.pid" d_log="$state/slurmd-%n.log"
    fi
    cat > "$conf.tmp" <<EOF
# Written by slurm/local_cluster.sh: a $nodes-node cluster for tests and demos.
ClusterName=ld-local
SlurmctldHost=$ctld_host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued batch job may start again cred_expire + 1 s after the requeue (default 120)
AuthInfo=socket=$socket,cred_expire=10
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$d_spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$d_pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$d_log
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
${nodelines%$'\n'}
PartitionName=debug Nodes=$partition Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$conf.tmp" "$conf"
}

ns_exists() {  # ns_exists NAME: whether network namespace NAME exists (`ip netns list` may add "(id: N)")
    ip netns list | grep -qx "$1\( (id: [0-9]*)\)\?"
}

make_network() {
    # The nodes' network: a namespace per node and one for the bridge; veth ld0 (node side) to n<i>
    # (bridge side). Namespaces of this cluster are listed in STATE_DIR/netns; another's are refused.
    command -v ip >/dev/null || die "ip not found (iproute2): apt-get install -y iproute2"
    command -v nsenter >/dev/null || die "nsenter not found (util-linux): apt-get install -y util-linux"
    local ns i all=("$netns-br")
    for i in $(seq 1 "$nodes"); do all+=("$(node_ns "$i")"); done
    if [[ -s "$state/netns" ]] && [[ "$(cat "$state/netns")" == "$(printf '%s\n' "${all[@]}")" ]] \
            && ip -n "$netns-br" link show br0 >/dev/null 2>&1; then
        return 0  # this cluster's network is up already
    fi
    remove_network  # what an earlier start of this cluster left half made
    for ns in "${all[@]}"; do
        if ns_exists "$ns"; then
            die "network namespace $ns exists but is not this cluster's (not in $state/netns):" \
                "another cluster's? stop that one, or set LD_SLURM_NETNS to another prefix"
        fi
    done
    : > "$state/netns"
    for ns in "${all[@]}"; do
        ip netns add "$ns" || die "ip netns add $ns failed: making network namespaces needs root (CAP_SYS_ADMIN)"
        echo "$ns" >> "$state/netns"
        ip -n "$ns" link set lo up
    done
    ip -n "$netns-br" link add br0 type bridge || die "no bridge in namespace $netns-br: the kernel lacks bridge support"
    ip -n "$netns-br" link set br0 up
    for i in $(seq 1 "$nodes"); do
        ns="$(node_ns "$i")"
        ip link add "$ifname" netns "$ns" type veth peer name "n$i" netns "$netns-br" \
            || die "could not make the veth pair of node$i: the kernel lacks veth support"
        ip -n "$netns-br" link set "n$i" master br0 up
        ip -n "$ns" addr add "$subnet.$i/24" dev "$ifname"
        ip -n "$ns" link set "$ifname" up
    done
}

remove_network() {  # ends what still runs in the cluster's namespaces (job leftovers), removes them
    [[ -s "$state/netns" ]] || return 0
    local ns pids
    while read -r ns; do
        ns_exists "$ns" || continue
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        if [[ -n $pids ]]; then
            # shellcheck disable=SC2086
            kill $pids 2>/dev/null || true
            sleep 1
            pids="$(ip netns pids "$ns" 2>/dev/null || true)"
            # shellcheck disable=SC2086
            [[ -n $pids ]] && kill -9 $pids 2>/dev/null || true
        fi
        ip netns del "$ns" || echo "local_cluster.sh: could not remove network namespace $ns" >&2
    done < "$state/netns"
    rm -f "$state/netns"
}

start() {
    [[ $EUID -eq 0 ]] || die "start needs root (slurmd runs jobs as their users)"
    for bin in munged slurmctld slurmd sinfo; do
        command -v "$bin" >/dev/null || die "$bin not found: apt-get install -y slurm-wlm munge"
    done
    if [[ -n $recorded && $recorded != "$nodes" ]] && running "$state/slurmctld.pid"; then
        die "the cluster in $state runs with $recorded node(s), not $nodes: stop it first"
    fi
    mkdir -p "$state/ctld" "$state/munge"
    echo "$nodes" > "$state/nodes"
    chmod 700 "$state/munge"
    if [[ ! -s "$state/munge/munge.key" ]]; then
        dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$state/munge/munge.key"
    fi
    [[ $nodes -gt 1 ]] && make_network
    if ! running "$state/munge/munged.pid"; then
        munged --force --key-file="$state/munge/munge.key" --socket="$socket" \
            --pid-file="$state/munge/munged.pid" --log-file="$state/munge/munged.log" \
            --seed-file="$state/munge/munged.seed" || die "munged failed: see $state/munge/munged.log"
    fi
    if ! running "$state/slurmctld.pid"; then
        write_conf
        in_head slurmctld -f "$conf" || die "slurmctld failed: see $state/slurmctld.log"
    fi
    local i name
    for i in $(seq 1 "$nodes"); do
        running "$(slurmd_pidfile "$i")" && continue
        if [[ $nodes -eq 1 ]]; then
            mkdir -p "$state/slurmd"
            slurmd -f "$conf" || die "slurmd failed: see $state/slurmd.log"
        else
            name="node$i"
            mkdir -p "$state/slurmd-$name"
            in_ns "$(node_ns "$i")" slurmd -f "$conf" -N "$name" \
                || die "slurmd of $name failed: see $state/slurmd-$name.log"
        fi
    done
    local states="" names
    names="$(for i in $(seq 1 "$nodes"); do node_name "$i"; done | paste -sd,)"
    for _ in $(seq 1 60); do
        # one line per node: NAME STATE
        states="$(in_head sinfo -h -N -n "$names" -o '%N %t' 2>/dev/null | sort -u || true)"
        if [[ $(grep -cE ' (idle|mix|alloc)' <<< "$states") -eq $nodes ]]; then
            echo "local SLURM cluster up: $(paste -sd, <<< "$states"), SLURM_CONF=$conf"
            return 0
        fi
        while read -r name st; do
            case "$st" in
                drain*|down*) in_head scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true ;;
            esac
        done <<< "$states"
        sleep 0.5
    done
    die "not every node is idle after 30 s (sinfo: '$(paste -sd';' <<< "$states")'); see $state/slurmctld.log and $state/slurmd*.log"
}

stop() {
    local pidfile pid pids=() i pidfiles=()
    for i in $(seq 1 "$nodes"); do pidfiles+=("$(slurmd_pidfile "$i")"); done
    pidfiles+=("$state/slurmctld.pid" "$state/munge/munged.pid")
    for pidfile in "${pidfiles[@]}"; do
        if running "$pidfile"; then
            pid="$(cat "$pidfile")"
            kill "$pid" && pids+=("$pid")
        fi
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    done
    rm -f "${pidfiles[@]}"
    remove_network
    echo "local SLURM cluster in $state stopped"
}

status() {
    local ok=0 i pidfile
    if running "$state/munge/munged.pid"; then echo "munged: running (pid $(cat "$state/munge/munged.pid"))"; else echo "munged: stopped"; ok=1; fi
    if running "$state/slurmctld.pid"; then echo "slurmctld: running (pid $(cat "$state/slurmctld.pid"))"; else echo "slurmctld: stopped"; ok=1; fi
    for i in $(seq 1 "$nodes"); do
        pidfile="$(slurmd_pidfile "$i")"
        if running "$pidfile"; then echo "slurmd $(node_name "$i"): running (pid $(cat "$pidfile"))"; else echo "slurmd $(node_name "$i"): stopped"; ok=1; fi
    done
    [[ $ok -eq 0 ]] && in_head sinfo || ok=1
    return $ok
}

env_lines() {
    echo "export SLURM_CONF=$conf"
    if [[ $nodes -gt 1 ]]; then
        echo "export GLOO_SOCKET_IFNAME=$ifname"
        echo "# client commands reach slurmctld from namespace $(node_ns 1) only: nsenter --net=/run/netns/$(node_ns 1) bash"
    fi
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) env_lines ;;
    exec)
        [[ -s $conf ]] || die "no cluster in $state (no slurm.conf): start one first"
        [[ $nodes -gt 1 ]] && export GLOO_SOCKET_IFNAME="$ifname"
        if [[ $nodes -eq 1 ]]; then exec "$@"; else exec nsenter --net="/run/netns/$(node_ns 1)" -- "$@"; fi ;;
    *) die "unknown command '$cmd'; $usage" ;;
esac
