#!/usr/bin/env bash
# Submit an r1mega job with the cluster settings taken from the environment; for `train`, first check the config
# for the job's world size with r1mega-check (seconds, no GPU), so a layout that cannot work never waits in the queue.
#
#   R1MEGA_NODES=2 R1MEGA_GPUS_PER_NODE=8 R1MEGA_PARTITION=gpu R1MEGA_ACCOUNT=proj R1MEGA_TIME=04:00:00 \
#     slurm/submit.sh train model=qwen2_5_7b parallel.tensor_model_parallel_size=4
#   slurm/submit.sh pipeline model=qwen2_5_7b
#   slurm/submit.sh convert import --hf HF_DIR --out CKPT_DIR
#
# R1MEGA_NODES (1), R1MEGA_GPUS_PER_NODE (8; 0 for CPU nodes), R1MEGA_TASKS_PER_NODE (GPUs per node, or 1),
# R1MEGA_PARTITION, R1MEGA_ACCOUNT, R1MEGA_TIME, R1MEGA_JOB_NAME: sbatch's --nodes, --gpus-per-node,
# --ntasks-per-node, --partition, --account, --time, --job-name (unset: the cluster's / script's default).
# R1MEGA_SBATCH_ARGS: more sbatch options, word-split. R1MEGA_CHECK=0 skips r1mega-check. R1MEGA_DRY_RUN=1 prints
# the sbatch command instead of running it. Everything else (R1MEGA_VENV, R1MEGA_CONTAINER, ...) reaches the job
# through sbatch's default --export=ALL; see slurm/common.sh. Prints sbatch's "Submitted batch job N".
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
usage() {
  echo "usage: $0 train|pipeline|convert [ARGS...]   (ARGS: Hydra overrides, or r1mega-convert's arguments)" >&2
  exit 2
}
[ $# -ge 1 ] || usage
kind=$1
shift
case $kind in train | pipeline | convert) ;; *) usage ;; esac

nodes=${R1MEGA_NODES:-1}
gpus=${R1MEGA_GPUS_PER_NODE:-8}
if [ "$gpus" -gt 0 ]; then
  tasks=${R1MEGA_TASKS_PER_NODE:-$gpus}
else
  tasks=${R1MEGA_TASKS_PER_NODE:-1}
fi

sbatch_cmd=(sbatch)
if [ "$kind" != convert ]; then
  sbatch_cmd+=(--nodes="$nodes" --ntasks-per-node="$tasks")
  if [ "$gpus" -gt 0 ]; then
    sbatch_cmd+=(--gpus-per-node="$gpus")
  fi
fi
[ -z "${R1MEGA_PARTITION:-}" ] || sbatch_cmd+=(--partition="$R1MEGA_PARTITION")
[ -z "${R1MEGA_ACCOUNT:-}" ] || sbatch_cmd+=(--account="$R1MEGA_ACCOUNT")
[ -z "${R1MEGA_TIME:-}" ] || sbatch_cmd+=(--time="$R1MEGA_TIME")
[ -z "${R1MEGA_JOB_NAME:-}" ] || sbatch_cmd+=(--job-name="$R1MEGA_JOB_NAME")
if [ -n "${R1MEGA_SBATCH_ARGS:-}" ]; then
  read -r -a extra <<<"$R1MEGA_SBATCH_ARGS"
  sbatch_cmd+=("${extra[@]}")
fi
sbatch_cmd+=("$here/$kind.sbatch" "$@")

if [ "$kind" = train ] && [ "${R1MEGA_CHECK:-1}" = 1 ]; then
  world=$((nodes * tasks))
  if [[ " $* " == *" --config-name"* || " $* " == *" -cn "* ]]; then
    echo "submit.sh: r1mega-check composes the default config only; not checking a --config-name run" >&2
  elif ! command -v r1mega-check >/dev/null; then
    echo "submit.sh: r1mega-check not found; activate r1mega's environment or set R1MEGA_CHECK=0" >&2
    exit 2
  else
    echo "submit.sh: checking the config for $world rank(s) ($nodes node(s) x $tasks task(s))" >&2
    r1mega-check --world-size "$world" "$@" >&2 || {
      echo "submit.sh: not submitted: the config does not work for $world rank(s)" >&2
      exit 2
    }
  fi
fi

if [ "${R1MEGA_DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${sbatch_cmd[@]}"
  printf '\n'
  exit 0
fi
R1MEGA_SLURM_DIR=$here exec "${sbatch_cmd[@]}"
