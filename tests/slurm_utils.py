"""Helpers for tests/slurm: submit to the local Slurm cluster, read job state, skip or fail without Slurm."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}

STEPS = 12
TRAIN_OVERRIDES = [
    "parallel=tp2",
    f"optim.train_steps={STEPS}",
    "optim.lr_warmup_steps=2",
    "data.seq_length=32",
    "checkpoint.save_interval=0",  # only the preemption checkpoint and the final one
    "logging.progress_bar=false",
    "logging.tensorboard=false",
]
"""The tiny model with TP=2 over two CPU tasks, 12 steps: what the Slurm tests train."""


def random_job_id() -> int:
    """A first job id for a test cluster: jobs rendezvous on port 20000 + id % 20000 (r1mega.parallel.bootstrap), so
    clusters started at the same time by different checkouts should not all count from 1."""
    return random.randrange(1000, 19000)


def latest_step(run_dir: Path) -> int:
    """The step of the checkpoint ``<run_dir>/checkpoints/latest`` names."""
    return int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])


def final_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"step_{STEPS:08d}"


def slurm_required() -> bool:
    """CI installed Slurm and shellcheck: a missing tool or a cluster that does not start is a failure."""
    return os.environ.get("R1MEGA_REQUIRE_SLURM") == "1"


def skip_or_fail(reason: str) -> None:
    if slurm_required():
        pytest.fail(f"{reason} (R1MEGA_REQUIRE_SLURM=1)")
    pytest.skip(reason)


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment jobs are submitted with (sbatch exports it): this checkout and this Python first."""
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    for key in [k for k in env if k.startswith(("R1MEGA_", "SLURM_")) and k != "R1MEGA_REQUIRE_SLURM"]:
        del env[key]
    env.update(extra or {})
    return env


@dataclass
class Cluster:
    """The running cluster: submit jobs, read their state, cancel what is left at the end."""

    conf: Path
    client: list[str] = field(default_factory=list)
    """What a client command runs under (``slurm/local_cluster.sh exec STATE_DIR`` for two nodes: on r1node1)."""
    jobs: list[str] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return job_env({"SLURM_CONF": str(self.conf), **extra})

    def run(self, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.client, *cmd], env=self.env(), capture_output=True, text=True, timeout=60, **kwargs
        )

    def submit(self, cmd: list[str], cwd: Path, **extra: str) -> str:
        """Run a submitting command (sbatch or slurm/submit.sh); return the job id."""
        proc = subprocess.run(
            [*self.client, *cmd], cwd=cwd, env=self.env(**extra), capture_output=True, text=True, timeout=120
        )
        match = re.search(r"Submitted batch job (\d+)", proc.stdout)
        assert proc.returncode == 0 and match, f"submitting failed: {proc.stdout}\n{proc.stderr}"
        self.jobs.append(match.group(1))
        return match.group(1)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in DONE_STATES:
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id} not finished after {timeout} s: {self.job(job_id)}")

    def preempt_and_wait(
        self, job_id: str, out: Path, start_timeout: float = 240, finish_timeout: float = 300
    ) -> tuple[dict[str, str], dict[str, float], str]:
        """Once the job's log shows step 3, send USR1 to its batch script and wait for the requeued run to end:
        (final ``scontrol`` state, seconds from the signal to pending/running/finished, the log of both runs)."""
        deadline = time.monotonic() + start_timeout
        while "step 3 " not in (out.read_text() if out.exists() else ""):
            assert time.monotonic() < deadline, f"no step 3 in time: {self.job(job_id)}"
            time.sleep(0.3)
        signalled = time.monotonic()
        sent = self.run("scancel", "--signal=USR1", "--batch", job_id)
        assert sent.returncode == 0, sent.stderr
        times: dict[str, float] = {}
        while (info := self.job(job_id)).get("JobState") not in DONE_STATES:
            if info.get("Restarts") == "1":
                times.setdefault(info["JobState"].lower(), time.monotonic() - signalled)  # pending, then running
            assert time.monotonic() - signalled < finish_timeout, f"job {job_id} not finished: {info}"
            time.sleep(0.5)
        times["finished"] = time.monotonic() - signalled
        return info, times, out.read_text()


def resumed_step(log: str, run_dir: Path, steps: int) -> int:
    """The step a preempted run stopped and checkpointed at, checked to be where the requeued run resumed."""
    stopped = re.search(r"stopped at step (\d+) on request; checkpoint saved", log)
    assert stopped, log[-4000:]
    k = int(stopped.group(1))
    assert 3 <= k < steps
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{k:08d}'} (step {k})" in log, log[-4000:]
    return k
