#!/usr/bin/env bash
# Stops what .ci/slurm-up.sh started: slurmd, slurmctld, munged.
set -uo pipefail
STATE=${LARSLAB_SLURM_DIR:-/tmp/larslab-slurm}
stop() {
    [ -s "$1" ] || return 0
    local pid
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}
stop "$STATE/slurmd.pid"
stop "$STATE/slurmctld.pid"
stop "$STATE/munge/munged.pid"
rm -f "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munge/munged.pid"
echo "slurm-down: stopped"
