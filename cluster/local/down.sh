#!/usr/bin/env bash
# Stop the local SLURM cluster started by up.sh (idempotent): its jobs are cancelled first, so that
# no job step outlives the daemons; munged is left running.
set -uo pipefail
STATE="${RLIPV2_SLURM_STATE:-${TMPDIR:-/tmp}/rlipv2-slurm}"
export SLURM_CONF="$STATE/slurm.conf"
if [[ -f "$STATE/slurmctld.pid" ]] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    partition=$(sinfo -h -o '%R' 2>/dev/null | head -n 1)
    if [[ -n "$partition" ]] && scancel --partition="$partition" 2>/dev/null; then
        for _ in $(seq 1 40); do     # KillWait (30 s) bounds how long a job takes to go
            [[ -z $(squeue -h -o '%i' 2>/dev/null) ]] && break
            sleep 1
        done
    fi
fi
for pid in "$STATE"/slurmd-*.pid "$STATE"/slurmctld.pid; do
    [[ -f "$pid" ]] || continue
    kill "$(cat "$pid")" 2>/dev/null || true
    rm -f "$pid"
done
for _ in $(seq 1 20); do
    pgrep -f "slurm(ctld|d) -f $STATE/slurm.conf" >/dev/null || exit 0
    sleep 0.5
done
pkill -9 -f "slurm(ctld|d) -f $STATE/slurm.conf" || true
