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
# Settings: LOCAL_SLURM_DIR (state and logs, default /var/lib/meds-local-slurm; start creates it, or takes an empty
# one, and marks it as its own), LOCAL_SLURM_SUBNET (default 10.77.0).
set -euo pipefail

STATE="${LOCAL_SLURM_DIR:-/var/lib/meds-local-slurm}"
SUBNET="${LOCAL_SLURM_SUBNET:-10.77.0}"
BRIDGE=meds-slurm0
CONF=/etc/slurm/slurm.conf
MARK="# written by scripts/local_slurm.sh"
# start removes a state directory only when this file in it says that start made it: LOCAL_SLURM_DIR is the user's
# to set, and may name a directory of theirs (their home). stop reads and removes state files only there as well.
OWNED="$STATE/.made-by-local_slurm.sh"
CONTROLLER="$SUBNET.254"

die() { echo "local_slurm.sh: $*" >&2; exit 1; }

# The start time of a live process (field 22 of /proc/<pid>/stat), nothing for a zombie or a pid that is gone.
# Fields are counted after the last ")": the command name before it, in parentheses, may hold spaces and ")".
start_time() {
    local stat fields
    { stat=$(<"/proc/$1/stat"); } 2>/dev/null || return 0
    read -r -a fields <<<"${stat##*)}"
    [[ ${fields[0]} == Z ]] || echo "${fields[19]}"
}

# "pid start-time" lines: a pid is ours only while its start time matches (pids wrap around); a zombie is gone.
record() {
    local start=""
    [[ -z $1 ]] || start=$(start_time "$1")
    [[ -n $start ]] || die "a daemon did not start (logs in $STATE/log)"
    echo "$1 $start" >>"$STATE/pids"
}
alive() { local now; now=$(start_time "$1"); [[ -n $now && $now == "$2" ]]; }

in_namespace() { # the host pids of every process in the PID namespace $1 (a /proc/<pid>/ns/pid link target)
    local link
    for link in /proc/[0-9]*/ns/pid; do
        [[ $(readlink "$link" 2>/dev/null) == "$1" ]] && basename "$(dirname "$(dirname "$link")")"
    done
    return 0
}

end_pids() { # SIGTERM, then SIGKILL after 10 s, for the pids we started ("pid start-time" lines), all at once
    local -A todo=()
    local pid start sig
    while read -r pid start; do todo[$pid]=$start; done
    for sig in TERM KILL; do
        for pid in "${!todo[@]}"; do alive "$pid" "${todo[$pid]}" && kill "-$sig" "$pid" 2>/dev/null; done
        for _ in $(seq 50); do
            for pid in "${!todo[@]}"; do alive "$pid" "${todo[$pid]}" || unset "todo[$pid]"; done
            [[ ${#todo[@]} != 0 ]] || return 0
            sleep 0.2
        done
    done
}

net_namespaces() { # the nodes' network namespaces: start names them meds-n<i>, and nothing else does
    ip netns list 2>/dev/null | awk '$1 ~ /^meds-n[0-9]+$/ {print $1}'
}

node_processes() { # the host pids of what is left in the nodes' network namespaces and the PID namespaces listed in $1
    local ns
    if [[ -f $1 ]]; then
        while read -r ns; do in_namespace "$ns"; done <"$1"
    fi
    for ns in $(net_namespaces); do ip netns pids "$ns" 2>/dev/null || true; done
}

stop() {
    local pid start ns pids="" namespaces="" config="" saved
    if [[ -f $CONF ]] && [[ $(head -1 "$CONF") == "$MARK"* ]]; then
        config=$CONF
        # The cluster of another LOCAL_SLURM_DIR: stopping it from here would take its nodes' network and bridge
        # but leave its daemons running, their pids being recorded there.
        saved=$(sed -n 's/^StateSaveLocation=//p' "$CONF")
        saved=${saved%/ctld}
        [[ $(realpath -m "$saved") == $(realpath -m "$STATE") ]] ||
            die "the local Slurm cluster here keeps its state in $saved: LOCAL_SLURM_DIR=$saved $0 stop"
    fi
    # Our config naming this directory vouches for it as well: a start before the mark made it.
    if [[ -f $OWNED || -n $config ]]; then
        pids=$STATE/pids namespaces=$STATE/pid-namespaces
    elif [[ -f $STATE/pids ]]; then
        echo "local_slurm.sh: $STATE was not made by this script (no $OWNED): its pids file is left alone" >&2
    fi
    # Not only what start recorded: a start that fails before it records a pid (munged was already running) leaves
    # the bridge, the config, maybe namespaces, and its EXIT trap has only stop to clean them up.
    if [[ ! -f $pids && -z $config && -z $(net_namespaces) ]] && ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        echo "local_slurm.sh: no local Slurm cluster is running"
        return 0
    fi
    # Nodes first (each takes its namespace's processes with it), then the controller, then munged.
    if [[ -f $pids ]]; then
        while read -r pid start; do end_pids <<<"$pid $start"; done < <(tac "$pids")
    fi
    # Then whatever is still in the nodes' namespaces (a node that a failed start did not record): only this
    # script makes them, so all of it is ours.
    for pid in $(node_processes "$namespaces" | sort -u); do
        start=$(start_time "$pid")
        [[ -z $start ]] || echo "$pid $start"
    done | end_pids
    for ns in $(net_namespaces); do
        ip link del "v-$ns" 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    [[ -z $config ]] || rm -f "$CONF" /etc/slurm/gres.conf
    [[ -z $pids ]] || rm -f "$pids" "$namespaces"
    echo "local_slurm.sh: stopped (logs in $STATE/log)"
}

start() {
    local nodes=${1:-2}
    [[ $nodes =~ ^[1-9][0-9]?$ ]] || die "start takes a node count from 1 to 99, got '$nodes'"
    [[ $(id -u) == 0 ]] || die "needs root (network namespaces, slurmd)"
    if [[ -e $STATE && ! -f $OWNED ]] && [[ ! -d $STATE || -n $(ls -A "$STATE") ]]; then
        die "$STATE exists, is not an empty directory and was not made by this script (it has no" \
            "${OWNED##*/}): remove it yourself or set LOCAL_SLURM_DIR to a new or empty directory"
    fi
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

    [[ ! -f $OWNED ]] || rm -rf "$STATE" # the last run's; any other directory that holds something was refused
    mkdir -p "$STATE" && echo "$MARK: start removes this directory and makes it anew" >"$OWNED"
    mkdir -p "$STATE/log" "$STATE/gpus" "$STATE/ctld"
    trap '[[ $? == 0 ]] || { echo "local_slurm.sh: start failed; logs in $STATE/log" >&2; stop >&2; }' EXIT
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
        ip netns add "$ns"
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

# Sourced (tests/test_local_slurm.py calls start_time, record and alive): the functions only.
if (return 0 2>/dev/null); then return 0; fi # `return` works only in a function or a sourced file
case "${1:-}" in
start) start "${2:-2}" ;;
stop) stop ;;
*) die "usage: scripts/local_slurm.sh start [N] | stop" ;;
esac
