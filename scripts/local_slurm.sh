#!/usr/bin/env bash
# A real Slurm cluster of N nodes on this one machine, for the tests and for trying the Slurm launcher
# (examples/scripts/train_meds_ray_slurm.sh) without a cluster. As root:
#
#   scripts/local_slurm.sh start 2    # installs slurm-wlm and munge when missing, starts nodes n1 and n2
#   MEDS_CPU=1 ENV_SETUP='source .venv/bin/activate' sbatch --wait -N 2 examples/scripts/train_meds_ray_slurm.sh
#   scripts/local_slurm.sh stop       # ends exactly what start started and removes its namespaces and config
#
# slurmctld runs on this host. Each node is a slurmd in namespaces of its own, so that it looks like a host:
#   network  address 10.77.0.<i> on a bridge (the controller is 10.77.0.254), so `ray symmetric-run` finds exactly
#            one head, and Ray's ports never meet those of a Ray cluster running on the host;
#   UTS      hostname n<i>, resolved by the node's own /etc/hosts to its address (`hostname --ip-address`);
#   mount    that /etc/hosts and an empty /tmp/ray for Ray's session files; the rest of the filesystem is shared,
#            as a cluster's home directories are;
#   PID      `ray stop` (which symmetric-run and the launcher's trap call) ends every Ray process it can see: here
#            it sees only its node's. The node's slurmd is its namespace's first process, so stopping it ends the
#            node's every process.
# Settings: LOCAL_SLURM_DIR (state and logs, default /var/lib/meds-local-slurm), LOCAL_SLURM_SUBNET (default 10.77.0).
set -euo pipefail

STATE="${LOCAL_SLURM_DIR:-/var/lib/meds-local-slurm}"
SUBNET="${LOCAL_SLURM_SUBNET:-10.77.0}"
BRIDGE=meds-slurm0
CONF=/etc/slurm/slurm.conf
MARK="# written by scripts/local_slurm.sh"
CONTROLLER="$SUBNET.254"

die() { echo "local_slurm.sh: $*" >&2; exit 1; }

# "pid start-time" lines: a pid is ours only while its start time matches (pids wrap around); a zombie is gone.
record() { [[ -n $1 ]] || die "a daemon did not start (logs in $STATE/log)"; echo "$1 $(awk '{print $22}' "/proc/$1/stat")" >>"$STATE/pids"; }
alive() { [[ $(awk '$3 != "Z" {print $22}' "/proc/$1/stat" 2>/dev/null) == "$2" ]]; }

in_namespace() { # the host pids of every process in the PID namespace $1 (a /proc/<pid>/ns/pid link target)
    local link
    for link in /proc/[0-9]*/ns/pid; do
        [[ $(readlink "$link" 2>/dev/null) == "$1" ]] && basename "$(dirname "$(dirname "$link")")"
    done
    return 0
}

end_pid() { # SIGTERM, then SIGKILL after 10 s, for a pid we started
    local pid=$1 start=$2
    alive "$pid" "$start" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do alive "$pid" "$start" || return 0; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 50); do alive "$pid" "$start" || return 0; sleep 0.2; done
}

stop() {
    [[ -f $STATE/pids ]] || { echo "local_slurm.sh: no local Slurm cluster is running"; return 0; }
    # Nodes first (each takes its namespace's processes with it), then the controller, then munged.
    local pid start ns left
    while read -r pid start; do end_pid "$pid" "$start"; done < <(tac "$STATE/pids")
    for ns in $(cat "$STATE/pid-namespaces" 2>/dev/null); do
        for _ in $(seq 50); do left=$(in_namespace "$ns"); [[ -z $left ]] && break; sleep 0.2; done
        [[ -z $left ]] || { echo "local_slurm.sh: still running in a node's namespace: $left" >&2; kill -KILL $left || true; }
    done
    for ns in $(cat "$STATE/net-namespaces" 2>/dev/null); do
        ip link del "v-$ns" 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    if [[ -f $CONF ]] && [[ $(head -1 "$CONF") == "$MARK"* ]]; then rm -f "$CONF" /etc/slurm/gres.conf; fi
    rm -f "$STATE/pids" "$STATE/pid-namespaces" "$STATE/net-namespaces"
    echo "local_slurm.sh: stopped (logs in $STATE/log)"
}

start() {
    local nodes=${1:-2}
    [[ $nodes =~ ^[1-9][0-9]?$ ]] || die "start takes a node count from 1 to 99, got '$nodes'"
    [[ $(id -u) == 0 ]] || die "needs root (network namespaces, slurmd)"
    [[ ! -f $STATE/pids ]] || die "a local Slurm cluster is already running (scripts/local_slurm.sh stop first)"
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        echo "installing slurm-wlm and munge ..."
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
    if [[ -f $CONF ]] && [[ $(head -1 "$CONF") != "$MARK"* ]]; then
        die "$CONF exists and was not written by this script: this machine has a Slurm of its own"
    fi
    ip link show "$BRIDGE" >/dev/null 2>&1 && die "network device $BRIDGE exists: run scripts/local_slurm.sh stop"
    ip -4 -o addr | grep -q " $SUBNET\." && die "$SUBNET.0/24 is in use here: set LOCAL_SLURM_SUBNET"

    rm -rf "$STATE" && mkdir -p "$STATE/log" "$STATE/gpus" "$STATE/ctld"
    trap 'status=$?; [[ $status == 0 ]] || { echo "local_slurm.sh: start failed; logs in $STATE/log" >&2; stop >&2; }' EXIT
    touch "$STATE/gpus/gpu"{0..7} # gres.conf needs a device file per GPU: plain files, no device behind them
    local host names
    host=$(hostname)
    names="n[1-$nodes]"
    mkdir -p /etc/slurm
    # The node shape the launcher's #SBATCH lines ask for (8 GPUs, 64 CPUs, --mem=0, --exclusive);
    # config_overrides lets a node declare more than the machine has.
    cat >"$CONF" <<EOF
$MARK (a local test cluster; scripts/local_slurm.sh stop removes it)
ClusterName=meds-local
SlurmctldHost=$host($CONTROLLER)
SlurmctldPort=17100
SlurmdPort=17101
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
KillWait=10
InactiveLimit=0
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdSpoolDir=$STATE/%n/spool
SlurmdPidFile=$STATE/%n/slurmd.pid
SlurmdLogFile=$STATE/log/slurmd.%n.log
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=DEFAULT CPUs=64 RealMemory=100000 Gres=gpu:8 State=UNKNOWN
EOF
    local i hosts="127.0.0.1 localhost"$'\n'"$CONTROLLER $host"
    for i in $(seq "$nodes"); do
        echo "NodeName=n$i NodeHostname=n$i NodeAddr=$SUBNET.$i" >>"$CONF"
        hosts+=$'\n'"$SUBNET.$i n$i"
    done
    echo "PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
    printf 'AutoDetect=off\nNodeName=%s Name=gpu File=%s/gpus/gpu[0-7]\n' "$names" "$STATE" >/etc/slurm/gres.conf

    if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        mkdir -p /run/munge && chown munge:munge /run/munge
        [[ -f /etc/munge/munge.key ]] || { mungekey --create && chown munge:munge /etc/munge/munge.key; }
        runuser -u munge -- munged --pid-file=/run/munge/local-slurm.pid # forks; the pid file names the daemon
        for _ in $(seq 50); do [[ -s /run/munge/local-slurm.pid ]] && break; sleep 0.1; done
        record "$(cat /run/munge/local-slurm.pid)"
    fi

    ip link add "$BRIDGE" type bridge
    ip addr add "$CONTROLLER/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    setsid slurmctld -D -c >"$STATE/log/slurmctld.out" 2>&1 &
    record $!

    for i in $(seq "$nodes"); do
        local ns="meds-n$i"
        mkdir -p "$STATE/n$i/spool" "$STATE/n$i/ray" /tmp/ray
        echo "$hosts" >"$STATE/n$i/hosts"
        ip netns add "$ns" && echo "$ns" >>"$STATE/net-namespaces"
        ip link add "v-$ns" type veth peer name eth0 netns "$ns"
        ip link set "v-$ns" master "$BRIDGE" && ip link set "v-$ns" up
        ip netns exec "$ns" ip addr add "$SUBNET.$i/24" dev eth0
        ip netns exec "$ns" ip link set eth0 up
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip route add default via "$CONTROLLER"
        # nsenter, not `ip netns exec`: the latter remounts /sys, and slurmd then finds no cgroup tree.
        # The node's first process is a shell that waits for slurmd: as the namespace's init it reaps the processes
        # orphaned there (Ray's daemons), which slurmd would leave as zombies that `ray stop` waits for in vain.
        setsid nsenter --net="/var/run/netns/$ns" unshare --uts --mount --pid --fork --mount-proc \
            sh -c "hostname n$i && mount --bind $STATE/n$i/hosts /etc/hosts && mount --bind $STATE/n$i/ray /tmp/ray &&
                slurmd -D -N n$i & wait" >"$STATE/log/slurmd.n$i.out" 2>&1 &
        local wrapper=$! init="" slurmd=""
        for _ in $(seq 50); do
            init=$(pgrep -P "$wrapper" || true)
            [[ -n $init ]] && slurmd=$(pgrep -P "$init" -x slurmd || true)
            [[ -n $slurmd ]] && break
            sleep 0.1
        done
        [[ -n $slurmd ]] || die "slurmd of n$i did not start (see $STATE/log/slurmd.n$i.out)"
        record "$init" && record "$slurmd" # stopped in reverse: slurmd, then the init if it is still there
        # The launcher's `ray stop --force` ends every Ray process it can see: only a node's own PID namespace
        # keeps the host's Ray clusters out of its sight.
        [[ $(readlink "/proc/$slurmd/ns/pid") != $(readlink /proc/self/ns/pid) ]] ||
            die "slurmd of n$i shares the host's PID namespace: ray stop there would reach the host's Ray"
        readlink "/proc/$slurmd/ns/pid" >>"$STATE/pid-namespaces"
    done

    local state=""
    for _ in $(seq 120); do
        state=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ')
        [[ $(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l) == "$nodes" ]] && break
        sleep 0.5
    done
    [[ $(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l) == "$nodes" ]] ||
        die "the nodes did not come up: ${state:-no answer from slurmctld} (logs in $STATE/log)"
    trap - EXIT
    echo "local_slurm.sh: $nodes node(s) up ($names at $SUBNET.1-$nodes, controller $CONTROLLER); stop with" \
        "scripts/local_slurm.sh stop"
}

case "${1:-}" in
start) start "${2:-2}" ;;
stop) stop ;;
*) die "usage: scripts/local_slurm.sh start [N] | stop" ;;
esac
