"""``r1mega-train`` end to end: the README's main job (shortened), and two ranks started the way srun does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_utils import free_port

QUICK = ["logging.progress_bar=false", "data.seq_length=32", "optim.lr_warmup_steps=0"]


def _losses(output: str) -> list[float]:
    return [
        float(part.split("=")[1])
        for line in output.splitlines()
        for part in line.split()
        if part.startswith("lm_loss=")
    ]


def test_main_job_trains_and_writes_tensorboard(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "r1mega.cli.train", "optim.train_steps=12", f"run_dir={tmp_path}", *QUICK],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(proc.stderr)
    assert len(losses) == 12 and losses[-1] < losses[0], losses
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "TensorBoard scalars missing"


@pytest.mark.slow
def test_two_ranks_from_slurm_variables_alone(tmp_path: Path) -> None:
    """No torchrun: SLURM_PROCID / SLURM_NTASKS / SLURM_JOB_NODELIST are all the bootstrap gets."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(
            SLURM_PROCID=str(rank),
            SLURM_NTASKS="2",
            SLURM_LOCALID=str(rank),
            SLURM_JOB_NODELIST="127.0.0.[1]",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
        )
        args = [
            sys.executable,
            "-m",
            "r1mega.cli.train",
            "parallel=tp2",
            "optim.train_steps=3",
            f"run_dir={tmp_path}",
            *QUICK,
        ]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    assert all(p.returncode == 0 for p in procs), outputs
    assert "via slurm" in outputs[0] and "TP=2" in outputs[0], outputs[0][-2000:]
    assert len(_losses(outputs[0])) == 3 and not _losses(outputs[1]), "only rank 0 logs"
