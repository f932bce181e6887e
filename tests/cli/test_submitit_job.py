"""``r1mega.cli.submitit_job``: in a submitit Slurm task, submitit's preemption signal reaches the training loop's
handler, and a stop with status 75 requeues the array task from rank 0 (``scontrol`` is a recording stand-in here;
the real thing runs in tests/slurm/test_submitit.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from r1mega.cli.exits import ExitCode
from r1mega.cli.submitit_job import PreemptedNotRequeued, submitit_preemption

pytest.importorskip("submitit")


@pytest.fixture
def task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Rank 0 of array task 4242_1 as submitit starts it, with an ``scontrol`` that records its arguments."""
    calls = tmp_path / "scontrol.calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {
        "SUBMITIT_EXECUTOR": "slurm",
        "SUBMITIT_FOLDER": str(tmp_path),
        "SLURM_JOB_ID": "4244",
        "SLURM_ARRAY_JOB_ID": "4242",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_PROCID": "0",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("R1MEGA_REQUEUE", raising=False)
    return calls


@pytest.fixture
def submitit_handler():
    """What submitit installs for USR2 before the job runs; records the signals it gets."""
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: got.append(signum))
    yield got
    signal.signal(signal.SIGUSR2, previous)


def test_usr2_goes_to_the_training_loop_while_it_runs_else_to_submitit(task, submitit_handler) -> None:
    from r1mega.train.signals import PreemptionHandler

    with submitit_preemption():
        os.kill(os.getpid(), signal.SIGUSR2)  # start-up: no loop handler yet
        assert submitit_handler == [signal.SIGUSR2]
        loop = PreemptionHandler()
        try:
            os.kill(os.getpid(), signal.SIGUSR2)
        finally:
            loop.close()
        assert loop.requested and loop.received == signal.SIGUSR2
        assert submitit_handler == [signal.SIGUSR2], "not submitit's requeue-now as well"
    os.kill(os.getpid(), signal.SIGUSR2)
    assert submitit_handler == [signal.SIGUSR2] * 2, "submitit's handler is back afterwards"


def test_a_preempted_stop_requeues_the_array_task_from_rank_0(task, submitit_handler) -> None:
    with pytest.raises(SystemExit) as stop, submitit_preemption():
        raise SystemExit(ExitCode.PREEMPTED)
    assert stop.value.code == ExitCode.PREEMPTED
    assert task.read_text() == "requeue 4242_1\n"


def test_other_ranks_and_other_exits_do_not_requeue(task, submitit_handler, monkeypatch) -> None:
    with pytest.raises(SystemExit), submitit_preemption():
        raise SystemExit(2)
    monkeypatch.setenv("SLURM_PROCID", "1")
    with pytest.raises(SystemExit), submitit_preemption():
        raise SystemExit(ExitCode.PREEMPTED)
    assert not task.exists()


def test_without_requeue_the_stop_is_an_error_the_sweep_records(task, submitit_handler, monkeypatch) -> None:
    monkeypatch.setenv("R1MEGA_REQUEUE", "0")
    with pytest.raises(PreemptedNotRequeued, match="4242_1 checkpointed on request; R1MEGA_REQUEUE=0"):
        with submitit_preemption():
            raise SystemExit(ExitCode.PREEMPTED)
    assert not task.exists()


def test_outside_a_submitit_task_nothing_changes(task, submitit_handler, monkeypatch) -> None:
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    before = signal.getsignal(signal.SIGUSR2)
    with pytest.raises(SystemExit), submitit_preemption():
        assert signal.getsignal(signal.SIGUSR2) is before
        raise SystemExit(ExitCode.PREEMPTED)
    assert not task.exists()
