# shellcheck shell=bash
# Shared by slurm/*.sbatch (sourced, not run): environment activation, the run folder and its job record, the
# srun launch (one task per GPU) and preemption -> checkpoint -> requeue. See slurm/README.md.
#
# Environment (all optional, nothing user-specific is baked in):
#   R1MEGA_SETUP           a file sourced first (module loads, exports, conda activate)
#   R1MEGA_VENV            a virtualenv to activate ($R1MEGA_VENV/bin/activate)
#   R1MEGA_CONTAINER       an Apptainer/Singularity image every task runs in, via $R1MEGA_CONTAINER_EXEC
#   R1MEGA_CONTAINER_EXEC  the command that runs in the image (default: "apptainer exec --nv"), word-split
#   R1MEGA_SRUN_ARGS       extra srun arguments, word-split (e.g. pyxis: "--container-image=... --container-mounts=...")
#   R1MEGA_RUN_DIR         the run folder unless a `run_dir=` override is given (default: $R1MEGA_RUNS/<job name>-
#                          <job id>: the job id survives requeues, so a requeued job finds its checkpoints)
#   R1MEGA_RUNS            where default run folders go (default: $SLURM_SUBMIT_DIR/runs)
#   R1MEGA_REQUEUE         1 (default in train/pipeline): requeue after a preemption checkpoint; 0: exit instead
#   R1MEGA_DRY_RUN         1: print the srun command line and exit without running it

# r1mega-train's exit status after it honoured a stop request and saved a checkpoint
# (r1mega.cli.exits.ExitCode.PREEMPTED; named once here for the shell).
R1MEGA_PREEMPTED=75

r1mega_log() {
  echo "r1mega-slurm $(date '+%F %T'): $*" >&2
}

# Source R1MEGA_SETUP, activate R1MEGA_VENV.
r1mega_activate() {
  if [ -n "${R1MEGA_SETUP:-}" ]; then
    # shellcheck disable=SC1090  # the user's own file
    source "$R1MEGA_SETUP" || { r1mega_log "R1MEGA_SETUP=$R1MEGA_SETUP failed"; return 1; }
  fi
  if [ -n "${R1MEGA_VENV:-}" ]; then
    if [ ! -f "$R1MEGA_VENV/bin/activate" ]; then
      r1mega_log "R1MEGA_VENV=$R1MEGA_VENV has no bin/activate; set it to a virtualenv folder"
      return 1
    fi
    # shellcheck disable=SC1091  # the user's virtualenv
    source "$R1MEGA_VENV/bin/activate"
  fi
}

# r1mega_run_dir OVERRIDES...: set R1MEGA_RUN_DIR (absolute) from a run_dir= override, R1MEGA_RUN_DIR or the job,
# and R1MEGA_ARGS to the overrides with run_dir=R1MEGA_RUN_DIR as the only run_dir.
r1mega_run_dir() {
  local arg dir=${R1MEGA_RUN_DIR:-}
  R1MEGA_ARGS=()
  for arg in "$@"; do
    case $arg in
      run_dir=*) dir=${arg#run_dir=} ;;
      *) R1MEGA_ARGS+=("$arg") ;;
    esac
  done
  if [ -z "$dir" ]; then
    dir=${R1MEGA_RUNS:-${SLURM_SUBMIT_DIR:-$PWD}/runs}/${SLURM_JOB_NAME:-r1mega}-${SLURM_JOB_ID:-local}
  fi
  case $dir in /*) ;; *) dir=$PWD/$dir ;; esac
  R1MEGA_RUN_DIR=$dir
  export R1MEGA_RUN_DIR
  R1MEGA_ARGS+=("run_dir=$R1MEGA_RUN_DIR")
}

# r1mega_record EVENT [DETAILS...]: append one line to <run dir>/slurm_jobs.log (every start, requeue and end).
r1mega_record() {
  local event=$1
  shift
  if [ "${R1MEGA_DRY_RUN:-0}" = 1 ] || [ -z "${R1MEGA_RUN_DIR:-}" ]; then
    return 0
  fi
  mkdir -p "$R1MEGA_RUN_DIR"
  printf '%s %s job=%s restart=%s nodes=%s tasks=%s %s\n' "$(date '+%F %T')" "$event" "${SLURM_JOB_ID:-none}" \
    "${SLURM_RESTART_COUNT:-0}" "${SLURM_JOB_NODELIST:-none}" "${SLURM_NTASKS:-1}" "$*" >>"$R1MEGA_RUN_DIR/slurm_jobs.log"
}

_r1mega_warned=0
_r1mega_pid=

# The warning signal (#SBATCH --signal=B:USR1@...) or `scancel --signal=USR1 --batch`: forward it to the srun
# step, which forwards it to every task; the trainer checkpoints at its next step boundary and exits 75.
_r1mega_on_warning() {
  _r1mega_warned=1
  r1mega_log "received USR1: asking the training step to checkpoint and stop"
  if [ -n "$_r1mega_pid" ]; then
    kill -USR1 "$_r1mega_pid" 2>/dev/null || true
  fi
}
trap _r1mega_on_warning USR1  # from the start: a warning during R1MEGA_SETUP must not kill this script

# r1mega_launch COMMAND [ARGS...]: run COMMAND under srun on every task of the allocation, wait for it and
# requeue the job if it stopped for a preemption. Returns COMMAND's exit status (0 after a requeue).
r1mega_launch() {
  # Not --kill-on-bad-exit: it would SIGTERM the ranks still exiting after the first one exits 75, and srun would
  # report 143. --wait instead: 120 s after the first task ends, srun kills the rest (ranks left waiting in a
  # collective by a crashed peer).
  local -a cmd=("$@") srun_cmd=(srun --kill-on-bad-exit=0 --wait=120) extra=() exec=()
  if [ -n "${R1MEGA_SRUN_ARGS:-}" ]; then
    read -r -a extra <<<"$R1MEGA_SRUN_ARGS"
    srun_cmd+=("${extra[@]}")
  fi
  if [ -n "${R1MEGA_CONTAINER:-}" ]; then
    read -r -a exec <<<"${R1MEGA_CONTAINER_EXEC:-apptainer exec --nv}"
    cmd=("${exec[@]}" "$R1MEGA_CONTAINER" "${cmd[@]}")
  fi
  if [ "${R1MEGA_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${srun_cmd[@]}" "${cmd[@]}"
    printf '\n'
    return 0
  fi
  if [ "$_r1mega_warned" = 1 ]; then  # the warning came before anything started: nothing to checkpoint
    r1mega_requeue "$R1MEGA_PREEMPTED"
    return $?
  fi
  r1mega_log "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: ${cmd[*]}"
  "${srun_cmd[@]}" "${cmd[@]}" &
  _r1mega_pid=$!
  if [ "$_r1mega_warned" = 1 ]; then  # the warning came just as srun was started
    kill -USR1 "$_r1mega_pid" 2>/dev/null || true
  fi
  local rc
  while :; do  # `wait` returns early (status > 128) whenever a trapped signal arrives; wait again
    wait "$_r1mega_pid"
    rc=$?
    kill -0 "$_r1mega_pid" 2>/dev/null || break
  done
  trap '' USR1  # a late warning (the step already ended) changes nothing
  _r1mega_pid=
  # Requeue when the trainer checkpointed on request (75), or when the warning killed it before its handler was
  # installed (start-up: status > 128); the requeued job resumes from the newest complete checkpoint.
  if [ "$rc" -eq "$R1MEGA_PREEMPTED" ] || { [ "$_r1mega_warned" = 1 ] && [ "$rc" -gt 128 ]; }; then
    r1mega_requeue "$rc"
    return $?
  fi
  r1mega_record end "exit=$rc"
  r1mega_log "finished with exit status $rc"
  return "$rc"
}

# r1mega_requeue STATUS: put this job back in the queue (same job id, so the same run folder).
r1mega_requeue() {
  local rc=$1
  if [ "${R1MEGA_REQUEUE:-1}" != 1 ] || [ -z "${SLURM_JOB_ID:-}" ]; then
    r1mega_record preempted "exit=$rc requeue=off"
    r1mega_log "stopped for preemption (exit $rc); not requeuing (R1MEGA_REQUEUE=${R1MEGA_REQUEUE:-1})"
    return "$rc"
  fi
  r1mega_record requeue "exit=$rc"
  if [ "$rc" -eq "$R1MEGA_PREEMPTED" ]; then
    r1mega_log "checkpointed and stopped (exit $rc): requeuing job $SLURM_JOB_ID"
  else
    r1mega_log "the warning signal ended the step before it could checkpoint (exit $rc): requeuing job" \
      "$SLURM_JOB_ID to resume from the previous checkpoint"
  fi
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    r1mega_log "scontrol requeue $SLURM_JOB_ID failed; resubmit with R1MEGA_RUN_DIR=${R1MEGA_RUN_DIR:-?} to resume"
    return "$rc"
  fi
  return 0
}
