#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for the Slurm integration test
# (tests/slurm.rs) and for trying `larslab sweep --emit slurm` by hand.
#
#   sudo apt-get install slurm-wlm munge    # Debian/Ubuntu, once
#   sudo .ci/slurm-up.sh                    # prints the export line below
#   export SLURM_CONF=/tmp/larslab-slurm/slurm.conf
#   cargo test --release --test slurm
#   sudo .ci/slurm-down.sh
#
# munged, slurmctld and slurmd are started directly (no systemd), as root,
# with their state, logs and slurm.conf under $LARSLAB_SLURM_DIR (default
# /tmp/larslab-slurm). The node is this machine with its real CPUs and memory
# (from `slurmd -C`); one partition, `debug`. Nothing is written to /etc.
set -euo pipefail
STATE=${LARSLAB_SLURM_DIR:-/tmp/larslab-slurm}
die() { echo "slurm-up: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (munged, slurmctld and slurmd are started directly)"
for bin in munged slurmctld slurmd sinfo sbatch; do
    command -v "$bin" >/dev/null || die "$bin not found: apt-get install slurm-wlm munge"
done
mkdir -p "$STATE"/{ctld,spool,log}
conf="$STATE/slurm.conf"
export SLURM_CONF=$conf

# munge: a key, its socket and state directories owned by the munge user.
MUNGE_KEY="$STATE/munge.key"
install -d -o munge -g munge -m 0700 "$STATE/munge" "$STATE/munge/lib"
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s "$MUNGE_KEY" ]; then
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
fi
chown munge:munge "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged --key-file="$MUNGE_KEY" \
        --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
        --seed-file="$STATE/munge/lib/munged.seed" --socket=/run/munge/munge.socket.2
fi
for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
done
munge -n </dev/null | unmunge >/dev/null || die "munged does not answer (see $STATE/munge/munged.log)"

# slurm.conf: the node as slurmd sees it (CPUs, sockets, cores, memory).
host=$(hostname -s)
node=$(slurmd -C | head -n 1)
case "$node" in NodeName=*) ;; *) die "slurmd -C printed no node line: $node" ;; esac
cat >"$conf" <<CONF
ClusterName=larslab
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
MinJobAge=600
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

pkill_pidfile() { [ -s "$1" ] && kill "$(cat "$1")" 2>/dev/null || true; }
pkill_pidfile "$STATE/slurmctld.pid"
pkill_pidfile "$STATE/slurmd.pid"
sleep 0.2
slurmctld -i
slurmd

# Up when the node is idle (or mixed/allocated) in the partition.
for _ in $(seq 60); do
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true)
    case "$state" in idle*|mixed*|allocated*) break ;; esac
    sleep 0.5
done
case "$state" in
    idle*|mixed*|allocated*) ;;
    *) tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
       die "the node is not up after 30 s (state: ${state:-none}); logs in $STATE/log" ;;
esac
echo "slurm-up: one-node cluster up ($node)"
echo "export SLURM_CONF=$conf"
