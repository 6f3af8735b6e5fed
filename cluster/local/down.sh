#!/usr/bin/env bash
# Stop the local one-node SLURM cluster started by up.sh (idempotent); munged is left running.
set -uo pipefail
STATE="${RLIPV2_SLURM_STATE:-${TMPDIR:-/tmp}/rlipv2-slurm}"
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
