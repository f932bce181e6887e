"""A run killed with SIGKILL (mid-training or mid-checkpoint-write) resumes to bit-identical final weights.

Also: SIGTERM produces a checkpoint and a clean exit; half-written checkpoints are never loaded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

STEPS = 6
ARGS = [
    f"optim.train_steps={STEPS}",
    "checkpoint.save_interval=2",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "data.seq_length=32",
    "optim.lr_warmup_steps=2",
]


def _train(run_dir: Path, *extra: str, kill_at: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run r1mega-train in its own session; afterwards kill whatever it left (a SIGKILLed trainer orphans
    dist_checkpointing's multiprocessing manager, which would hold the output pipes open)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("R1MEGA_KILL_AT", None)
    if kill_at:
        env["R1MEGA_KILL_AT"] = kill_at
    log = run_dir / f"train-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "r1mega.cli.train", *ARGS, f"run_dir={run_dir}", *extra],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log.read_text()
    return subprocess.CompletedProcess(proc.args, proc.returncode, text, text)


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read in a 1-process gloo group."""
    import torch.distributed as dist
    from dist_utils import free_port
    from megatron.core import dist_checkpointing

    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        return dist_checkpointing.load_plain_tensors(str(checkpoint))
    finally:
        if owner:
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("uninterrupted")
    proc = _train(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = run / "checkpoints" / f"step_{STEPS:08d}"
    assert (final / "meta.json").is_file()
    return _tensors(final)


def _flat(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif torch.is_tensor(value):
            out[f"{prefix}{key}"] = value
    return out


def _assert_identical(a: dict, b: dict) -> None:
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys()
    optim_keys = [k for k in a if k.startswith("optimizer")]
    model_keys = [k for k in a if not k.startswith("optimizer")]
    assert model_keys and optim_keys
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["train_step:5", "checkpoint_write:4"])
def test_sigkill_then_resume_is_bit_identical(tmp_path: Path, uninterrupted, kill_at: str) -> None:
    crashed = _train(tmp_path, kill_at=kill_at)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    ckpts = tmp_path / "checkpoints"
    if kill_at.startswith("checkpoint_write"):
        assert list(ckpts.glob(".tmp_step_00000004")), "the half-written checkpoint should be left behind"
        assert (ckpts / "latest").read_text() == "step_00000002"
    resumed = _train(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected_from = "step_00000004" if kill_at.startswith("train_step") else "step_00000002"
    assert f"resumed from {ckpts / expected_from}" in resumed.stderr
    assert not list(ckpts.glob(".tmp_*"))
    _assert_identical(uninterrupted, _tensors(ckpts / f"step_{STEPS:08d}"))


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "r1mega.cli.train", *ARGS, "optim.train_steps=400", f"run_dir={tmp_path}"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 200
    seen = ""
    while time.time() < deadline:  # wait until training is under way, then preempt
        line = proc.stderr.readline()
        seen += line
        if "step 3 " in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=200)
    seen += rest
    assert proc.returncode == 0, seen[-3000:]
    assert "checkpoint saved" in seen
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    step = int(latest.split("_")[1])
    assert 3 <= step < 400
