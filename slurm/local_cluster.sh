#!/usr/bin/env bash
# A real Slurm cluster on this machine (slurmctld + slurmd + munged), for trying the sbatch scripts and for the tests
# in tests/slurm. Needs root and Debian's `slurm-wlm` and `munge` packages (and iproute2 + util-linux for 2 nodes).
#
#   slurm/local_cluster.sh start STATE_DIR [NODES]  # writes STATE_DIR/slurm.conf, starts the daemons, waits for them
#   slurm/local_cluster.sh exec STATE_DIR CMD...     # runs a client (sbatch, srun, squeue, scontrol) on this cluster
#   slurm/local_cluster.sh stop STATE_DIR            # stops the daemons it started (munged only if it started it)
#
# One node (the default): the node is this machine (NodeAddr=127.0.0.1) with all its CPUs as Slurm CPUs, and
# `export SLURM_CONF=STATE_DIR/slurm.conf` is all a client needs. Two nodes (NODES=2): each node is a separate host as
# far as Slurm, srun and torch.distributed can tell: its own network namespace (one veth pair between the two,
# 10.231.0.1 and 10.231.0.2, nothing else reachable), its own hostname (r1node1, r1node2; a UTS namespace) and its own
# /etc/hosts naming both (bind-mounted in a private mount namespace), each running its own slurmd; slurmctld runs on
# r1node1, so clients run there (`exec`). Each node offers all of this machine's CPUs.
# No cgroups, no accounting. Requeue is fast (credentials expire after 10 s, the scheduler runs every 2 s) so a
# requeued job restarts within seconds instead of ~160 s. State is wiped on start (a stale state directory fails with
# "CLUSTER NAME MISMATCH"). Ports: SLURMCTLD_PORT (default 6817) and SLURMD_PORT (6818); FIRST_JOB_ID (default 1)
# numbers the jobs (a job's rendezvous port is 20000 + job id % 20000: two clusters on one machine need distinct ids).
set -euo pipefail

usage() {
  echo "usage: $0 start STATE_DIR [1|2] | exec STATE_DIR CMD... | stop STATE_DIR" >&2
  exit 2
}

[ $# -ge 2 ] || usage
action=$1
state=$(mkdir -p "$2" && cd "$2" && pwd)
shift 2
conf=$state/slurm.conf
# Two nodes: network namespaces and veth names come from the state folder, so two clusters never share them.
tag=$(printf '%s' "$state" | cksum | cut -d ' ' -f 1)
SUBNET=10.231.0

netns_of() {  # netns_of N: node N's network namespace
  echo "r1mega-$tag-$1"
}

node_count() {  # the NODES of the last start (1 when there was none)
  cat "$state/nodes" 2>/dev/null || echo 1
}

# Settings both layouts share; the node lines and per-node files follow.
write_common_conf() {
  local controller=$1
  cat >"$conf" <<EOF
ClusterName=r1mega-local
FirstJobId=${FIRST_JOB_ID:-1}
SlurmctldHost=$controller
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
SlurmctldPidFile=$state/slurmctld.pid
SlurmctldLogFile=$state/slurmctld.log
EOF
}

write_conf() {
  local nodes=$1 hardware i
  # `slurmd -C` prints this machine's NodeName/CPUs/sockets/cores/memory line, then an UpTime line.
  hardware=$(slurmd -C | head -n 1)
  if [ "$nodes" -eq 1 ]; then
    write_common_conf "$(hostname -s)(127.0.0.1)"
    cat >>"$conf" <<EOF
SlurmdSpoolDir=$state/slurmd
SlurmdPidFile=$state/slurmd.pid
SlurmdLogFile=$state/slurmd.log
$hardware NodeAddr=127.0.0.1 State=UNKNOWN
EOF
  else
    write_common_conf "r1node1($SUBNET.1)"
    cat >>"$conf" <<EOF
SlurmdSpoolDir=$state/slurmd-%n
SlurmdPidFile=$state/slurmd-%n.pid
SlurmdLogFile=$state/slurmd-%n.log
EOF
    for i in $(seq 1 "$nodes"); do
      echo "NodeName=r1node$i NodeAddr=$SUBNET.$i ${hardware#NodeName=* } State=UNKNOWN" >>"$conf"
    done
  fi
  echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$conf"
}

# Two hosts: a network namespace each, joined by one veth pair (the addresses exist only inside these two
# namespaces), and the /etc/hosts both will see.
make_hosts() {
  local one two a=r1v${tag:0:8}a b=r1v${tag:0:8}b
  one=$(netns_of 1)
  two=$(netns_of 2)
  printf '127.0.0.1 localhost\n%s.1 r1node1\n%s.2 r1node2\n' "$SUBNET" "$SUBNET" >"$state/hosts"
  printf '%s\n' "$one" "$two" >"$state/netns"
  ip netns add "$one"
  ip netns add "$two"
  ip link add "$a" type veth peer name "$b"
  ip link set "$a" netns "$one"
  ip link set "$b" netns "$two"
  ip -n "$one" addr add "$SUBNET.1/24" dev "$a"
  ip -n "$two" addr add "$SUBNET.2/24" dev "$b"
  ip -n "$one" link set "$a" up
  ip -n "$two" link set "$b" up
  ip -n "$one" link set lo up
  ip -n "$two" link set lo up
}

remove_hosts() {
  local ns
  [ -f "$state/netns" ] || return 0
  while read -r ns; do
    ip netns del "$ns" 2>/dev/null || true  # its end of the veth pair, and so the pair, goes with it
  done <"$state/netns"
  rm -f "$state/netns"
}

# on_node N CMD...: run CMD as host r1nodeN: its network namespace, its hostname, its /etc/hosts. Daemons started
# this way keep all three, and so do the job steps they start.
on_node() {
  local n=$1
  shift
  # shellcheck disable=SC2016  # $1.. belong to the inner shell
  nsenter --net="/run/netns/$(netns_of "$n")" unshare --uts --mount -- \
    sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' node "$state/hosts" "r1node$n" "$@"
}

# client CMD...: run a Slurm client (sbatch, srun, scontrol, ...) where it reaches slurmctld.
client() {
  if [ "$(node_count)" -gt 1 ]; then
    SLURM_CONF=$conf nsenter --net="/run/netns/$(netns_of 1)" "$@"
  else
    SLURM_CONF=$conf "$@"
  fi
}

munge_ok() {
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

start() {
  local nodes=${1:-1} tool i _
  case $nodes in 1 | 2) ;; *) echo "$0: NODES must be 1 or 2, not $nodes" >&2; exit 2 ;; esac
  if [ "$(id -u)" -ne 0 ]; then
    echo "$0: must run as root (slurmd starts job steps as their user)" >&2
    exit 1
  fi
  for tool in slurmctld slurmd munged sinfo; do
    command -v "$tool" >/dev/null || { echo "$0: $tool not found: apt-get install slurm-wlm munge" >&2; exit 1; }
  done
  if [ "$nodes" -gt 1 ]; then
    for tool in ip nsenter unshare; do
      command -v "$tool" >/dev/null || { echo "$0: $tool not found: apt-get install iproute2 util-linux" >&2; exit 1; }
    done
  fi
  stop_daemons
  remove_hosts
  rm -rf "$state/ctld" "$state"/slurmd*
  mkdir -p "$state/ctld"
  echo "$nodes" >"$state/nodes"
  write_conf "$nodes"
  if ! munge_ok; then
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- munged
    touch "$state/started_munged"
  fi
  munge_ok || { echo "$0: munged does not answer (munge -n | unmunge failed)" >&2; exit 1; }
  # -c: start clean (no saved jobs), -i: ignore errors from the (absent) state files.
  if [ "$nodes" -eq 1 ]; then
    mkdir -p "$state/slurmd"
    SLURM_CONF=$conf slurmctld -c -i
    SLURM_CONF=$conf slurmd -c
  else
    make_hosts || { echo "$0: could not make the two hosts' network namespaces and veth pair" >&2; exit 1; }
    on_node 1 env SLURM_CONF="$conf" slurmctld -c -i
    for i in $(seq 1 "$nodes"); do
      mkdir -p "$state/slurmd-r1node$i"
      on_node "$i" env SLURM_CONF="$conf" slurmd -c -N "r1node$i"
    done
  fi
  for _ in $(seq 1 150); do
    if [ "$(client sinfo -h -N -o '%t' 2>/dev/null | grep -cx 'idle')" -eq "$nodes" ]; then
      echo "local Slurm up with $nodes node(s): $0 exec $state CMD... (1 node: export SLURM_CONF=$conf)"
      return 0
    fi
    sleep 0.2
  done
  echo "$0: the node(s) did not become idle in 30 s; see the logs in $state" >&2
  client sinfo -N >&2 || true
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
  local file
  for file in "$state"/slurmd*.pid; do
    kill_pidfile "$file"
  done
  kill_pidfile "$state/slurmctld.pid"
}

stop() {
  stop_daemons
  remove_hosts
  if [ -f "$state/started_munged" ]; then
    kill_pidfile /run/munge/munged.pid
    rm -f "$state/started_munged"
  fi
}

case $action in
  start)
    [ $# -le 1 ] || usage
    start "$@"
    ;;
  exec)
    [ $# -ge 1 ] || usage
    client "$@"
    ;;
  stop)
    [ $# -eq 0 ] || usage
    stop
    ;;
  *) usage ;;
esac
