#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (slurmctld + slurmd + munged), for trying the sbatch scripts
# and for the tests in tests/slurm. Needs root and Debian's `slurm-wlm` and `munge` packages.
#
#   slurm/local_cluster.sh start STATE_DIR   # writes STATE_DIR/slurm.conf, starts the daemons, waits for the node
#   export SLURM_CONF=STATE_DIR/slurm.conf   # then sbatch / srun / squeue / scontrol use this cluster
#   slurm/local_cluster.sh stop STATE_DIR    # stops the daemons it started (munged only if it started it)
#
# The node is this machine (NodeAddr=127.0.0.1) with all its CPUs as Slurm CPUs. No cgroups, no accounting.
# Requeue is fast (credentials expire after 10 s, the scheduler runs every 2 s) so a requeued job restarts
# within seconds instead of ~160 s. State is wiped on start (a stale state directory fails with
# "CLUSTER NAME MISMATCH"). Ports: SLURMCTLD_PORT (default 6817) and SLURMD_PORT (6818); FIRST_JOB_ID (default 1)
# numbers the jobs (a job's rendezvous port is 20000 + job id % 20000: two clusters on one machine need distinct ids).
set -euo pipefail

usage() {
  echo "usage: $0 start|stop STATE_DIR" >&2
  exit 2
}

[ $# -eq 2 ] || usage
action=$1
state=$(mkdir -p "$2" && cd "$2" && pwd)
conf=$state/slurm.conf

write_conf() {
  local node host
  host=$(hostname -s)
  # `slurmd -C` prints this machine's NodeName/CPUs/sockets/cores/memory line, then an UpTime line.
  node=$(slurmd -C | head -n 1)
  cat >"$conf" <<EOF
ClusterName=r1mega-local
FirstJobId=${FIRST_JOB_ID:-1}
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=5
MinJobAge=600
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

munge_ok() {
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

start() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "$0: must run as root (slurmd starts job steps as their user)" >&2
    exit 1
  fi
  for tool in slurmctld slurmd munged sinfo; do
    command -v "$tool" >/dev/null || { echo "$0: $tool not found: apt-get install slurm-wlm munge" >&2; exit 1; }
  done
  stop_daemons
  rm -rf "$state/ctld" "$state/slurmd"
  mkdir -p "$state/ctld" "$state/slurmd"
  write_conf
  if ! munge_ok; then
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- munged
    touch "$state/started_munged"
  fi
  munge_ok || { echo "$0: munged does not answer (munge -n | unmunge failed)" >&2; exit 1; }
  # -c: start clean (no saved jobs), -i: ignore errors from the (absent) state files.
  SLURM_CONF=$conf slurmctld -c -i
  SLURM_CONF=$conf slurmd -c
  local _
  for _ in $(seq 1 100); do
    if SLURM_CONF=$conf sinfo -h -o '%t' 2>/dev/null | grep -qx 'idle'; then
      echo "local Slurm up: export SLURM_CONF=$conf"
      return 0
    fi
    sleep 0.2
  done
  echo "$0: the node did not become idle in 20 s; see $state/slurmctld.log and $state/slurmd.log" >&2
  SLURM_CONF=$conf sinfo >&2 || true
  exit 1
}

kill_pidfile() {
  local file=$1 pid _
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "$file"
}

stop_daemons() {
  kill_pidfile "$state/slurmd.pid"
  kill_pidfile "$state/slurmctld.pid"
}

stop() {
  stop_daemons
  if [ -f "$state/started_munged" ]; then
    kill_pidfile /run/munge/munged.pid
    rm -f "$state/started_munged"
  fi
}

case $action in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
