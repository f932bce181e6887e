"""train.sbatch's preemption semantics inside a Slurm job started by hydra-submitit-launcher
(``r1mega-train -m hydra/launcher=submitit_slurm ...``; slurm/README.md).

train.sbatch: USR1 (the timed warning, or ``scancel --signal=USR1 --batch``) reaches every rank, the ranks
checkpoint at the next step boundary and exit 75, and the batch script runs ``scontrol requeue``; the rerun resumes
from the newest complete checkpoint.

submitit: Slurm sends submitit's signal (USR2, or ``SUBMITIT_PREEMPT_SIGNAL``) ``signal_delay_s`` before the time
limit to every task (``--signal=USR2@<s>``, no ``B:``). submitit's own handler would requeue at once from rank 0,
without a checkpoint. Here, while the training loop's handler is installed, that signal goes to it instead (every
rank stops at the next step boundary and saves a checkpoint), and when the job then exits 75, rank 0 runs
``scontrol requeue <job id>`` (``<array job>_<task>`` for a sweep's array task). The requeued job runs the same
Hydra job again, in the same run folder (``r1mega.cli.sweeps.job_run_dir``), and resumes from that checkpoint.
Outside the loop (start-up, evaluation, tear-down) submitit's handler runs as before: requeue now, resume from the
previous checkpoint. ``R1MEGA_REQUEUE=0`` stops after the checkpoint instead: the job then fails in Hydra's report.

What differs from submitit's own handling: ``max_num_timeout`` does not limit these requeues (train.sbatch has no
limit either), the signal is submitit's (USR2), not train.sbatch's USR1 (``scancel --signal=USR2 JOB`` preempts by
hand), and rank 0 requeues from inside the job instead of a batch script after ``srun`` returned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from r1mega.cli.exits import ExitCode


class PreemptedNotRequeued(RuntimeError):
    """The job saved a checkpoint on request and was not requeued (Hydra records the job as failed)."""


def _log(message: str) -> None:
    print(f"r1mega-submitit: {message}", file=sys.stderr, flush=True)


def in_submitit_slurm_job() -> bool:
    """True in a task that submitit's Slurm executor started (its sbatch script exports SUBMITIT_EXECUTOR)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SUBMITIT_FOLDER" in os.environ


def _forwarder(submitit_handler: Any) -> Any:
    """submitit's preemption signal -> r1mega's handler while the training loop has one, else submitit's own."""
    from r1mega.train.signals import PreemptionHandler

    def forward(signum: int, frame: FrameType | None) -> None:
        r1mega_handler = signal.getsignal(signal.SIGUSR1)
        if isinstance(getattr(r1mega_handler, "__self__", None), PreemptionHandler):
            r1mega_handler(signum, frame)  # checkpoint at the next step boundary, then exit 75
        elif callable(submitit_handler):
            submitit_handler(signum, frame)

    return forward


def _requeue(job_id: str) -> bool:
    """``scontrol requeue JOB``: the job goes back to the queue with the same id and arguments."""
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        _log(f"scontrol requeue {job_id} failed: {done.stderr.strip()}; re-run the sweep with its hydra.sweep.dir")
        return False
    _log(f"checkpointed and stopped (exit {int(ExitCode.PREEMPTED)}): requeued job {job_id}")
    return True


@contextmanager
def submitit_preemption() -> Iterator[None]:
    """Inside a submitit Slurm task: route submitit's preemption signal to the training loop and requeue after its
    checkpoint (see the module docstring). Elsewhere: nothing."""
    if not in_submitit_slurm_job():
        yield
        return
    import submitit

    env = submitit.JobEnvironment()
    usr_sig = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
    submitit_handler = signal.signal(usr_sig, _forwarder(signal.getsignal(usr_sig)))
    try:
        yield
    except SystemExit as stop:
        if stop.code != ExitCode.PREEMPTED:
            raise
        # Not requeued: an error, not an exit, so that submitit writes the task's result and the sweep sees it end.
        if os.environ.get("R1MEGA_REQUEUE", "1") != "1":
            raise PreemptedNotRequeued(f"job {env.job_id} checkpointed on request; R1MEGA_REQUEUE=0") from None
        if env.global_rank == 0 and not _requeue(env.job_id):
            raise PreemptedNotRequeued(f"job {env.job_id} checkpointed on request; requeue failed") from None
        raise
    finally:
        signal.signal(usr_sig, submitit_handler)
