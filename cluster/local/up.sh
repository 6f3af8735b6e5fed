#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine (root, loopback, its own ports and state
# directory) from Debian's slurm-wlm and munge. Idempotent: a running cluster is left as it is.
#   cluster/local/up.sh            # installs the packages if missing, starts munged, slurmctld, slurmd
#   export SLURM_CONF=$(cluster/local/up.sh --print-conf)
set -euo pipefail

STATE="${RLIPV2_SLURM_STATE:-${TMPDIR:-/tmp}/rlipv2-slurm}"
CTLD_PORT="${RLIPV2_SLURM_CTLD_PORT:-16817}"
SLURMD_PORT="${RLIPV2_SLURM_SLURMD_PORT:-16818}"
# >1: node1..nodeN on this one host, one slurmd each on consecutive ports (Debian's slurmd is
# built with multiple-slurmd support).
NODES="${RLIPV2_SLURM_NODES:-1}"
CONF="$STATE/slurm.conf"

if [[ "${1:-}" == "--print-conf" ]]; then echo "$CONF"; exit 0; fi
[[ $(id -u) -eq 0 ]] || { echo "cluster/local/up.sh: must run as root (slurmd runs jobs as their user)" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "installing slurm-wlm and munge ..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

mkdir -p "$STATE"/{ctld,log,spool} /run/munge
chown munge:munge /run/munge 2>/dev/null || true
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    # The Debian unit runs munged as the munge user; do the same without systemd.
    runuser -u munge -- /usr/sbin/munged --force
fi

CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)   # nproc obeys OMP_NUM_THREADS
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
MEM_PER_NODE=$(( MEM_MB / NODES ))
if (( NODES > 1 )); then
    NODE_LINE="NodeName=node[1-$NODES] NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$SLURMD_PORT-$((SLURMD_PORT + NODES - 1)) CPUs=$CPUS RealMemory=$MEM_PER_NODE State=UNKNOWN"
    NODE_NAMES="node[1-$NODES]"
else
    NODE_LINE="NodeName=$(hostname) NodeAddr=127.0.0.1 Port=$SLURMD_PORT CPUs=$CPUS RealMemory=$MEM_PER_NODE State=UNKNOWN"
    NODE_NAMES="$(hostname)"
fi

cat >"$CONF.new" <<CONF
ClusterName=rlipv2local
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
# A requeued job waits until its old credential expires (default 120 s): keep the wait short.
AuthInfo=cred_expire=10
KillWait=30
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
$NODE_LINE
PartitionName=debug Nodes=$NODE_NAMES Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
export SLURM_CONF="$CONF"
if [[ -f "$CONF" ]] && ! cmp -s "$CONF" "$CONF.new"; then
    # Another layout (node count, ports) than the running daemons': restart them on the new one.
    RLIPV2_SLURM_STATE="$STATE" bash "$(dirname "$0")/down.sh"
fi
mv "$CONF.new" "$CONF"

if ! { [[ -f "$STATE/slurmctld.pid" ]] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; }; then
    slurmctld -f "$CONF" -c   # -c: clean start, no stale job state from an earlier cluster
fi
if (( NODES > 1 )); then
    for i in $(seq 1 "$NODES"); do
        pid="$STATE/slurmd-node$i.pid"
        if ! { [[ -f "$pid" ]] && kill -0 "$(cat "$pid")" 2>/dev/null; }; then slurmd -f "$CONF" -N "node$i"; fi
    done
else
    pid="$STATE/slurmd-$(hostname).pid"
    if ! { [[ -f "$pid" ]] && kill -0 "$(cat "$pid")" 2>/dev/null; }; then slurmd -f "$CONF"; fi
fi

for _ in $(seq 1 60); do
    # Ready when every node answers (idle, or already running jobs).
    states=$(sinfo -h -N -o '%t' 2>/dev/null || true)
    if [[ $(grep -cE '^(idle|mix|alloc)' <<<"$states") -eq $NODES ]]; then
        echo "$CONF"
        exit 0
    fi
    sleep 1
done
echo "cluster/local/up.sh: not all $NODES node(s) became idle; see $STATE/log/" >&2
sinfo -N -l >&2 || true
exit 1
