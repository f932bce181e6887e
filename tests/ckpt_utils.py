"""Run r1mega-train as a subprocess (optionally crashing it) and compare checkpoints tensor by tensor.

Processes start from the test zygote (``zygote.spawn``: a fork of a warm interpreter, not a fresh one)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from zygote import spawn


def run_trainer(
    args: list[str], run_dir: Path, *extra: str, kill_at: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run r1mega-train in its own session; afterwards kill whatever it left (a SIGKILLed trainer orphans
    dist_checkpointing's multiprocessing manager, which would hold the output pipes open)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("R1MEGA_KILL_AT", None)
    if kill_at:
        env["R1MEGA_KILL_AT"] = kill_at
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / f"train-{time.monotonic_ns()}.log"
    proc = spawn(["-m", "r1mega.cli.train", *args, f"run_dir={run_dir}", *extra], env, log)
    try:
        proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = log.read_text()
    return subprocess.CompletedProcess(proc.args, proc.returncode, text, text)


def run_trainer_ranks(
    args: list[str],
    run_dir: Path,
    ranks: int,
    *extra: str,
    kill_at: str | None = None,
    timeout: float = 300,
    module: str = "r1mega.cli.train",
) -> list[str]:
    """Run ``ranks`` processes of ``python -m module`` (r1mega-train by default; torchrun's variables, as
    run_ranks sets them, when more than one); return each rank's log, headed ``[rc=N]``. Each rank gets its
    own session, killed afterwards (see run_trainer)."""
    from dist_utils import free_port, rank_env

    run_dir.mkdir(parents=True, exist_ok=True)
    port, procs, logs = free_port(), [], []
    for rank in range(ranks):
        env = rank_env(rank, ranks, port) if ranks > 1 else dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("R1MEGA_KILL_AT", None)
        if kill_at:
            env["R1MEGA_KILL_AT"] = kill_at
        logs.append(run_dir / f"{module.rsplit('.', 1)[-1]}-rank{rank}-{time.monotonic_ns()}.log")
        procs.append(spawn(["-m", module, *args, f"run_dir={run_dir}", *extra], env, logs[-1]))
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    texts = [log.read_text() for log in logs]
    return [f"[rc={code}]\n{text}" for code, text in zip(codes, texts, strict=True)]


def checkpoint_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read in a 1-process gloo group."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    owner = not dist.is_initialized()
    if owner:  # port 0: the system picks a free port as the store binds it
        dist.init_process_group("gloo", store=dist.TCPStore("127.0.0.1", 0, 1, is_master=True), rank=0, world_size=1)
    try:
        return dist_checkpointing.load_plain_tensors(str(checkpoint))
    finally:
        if owner:
            dist.destroy_process_group()


def _flat(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif torch.is_tensor(value):
            out[f"{prefix}{key}"] = value
    return out


def assert_identical(a: dict, b: dict) -> None:
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys()
    optim_keys = [k for k in a if k.startswith("optimizer")]
    model_keys = [k for k in a if not k.startswith("optimizer")]
    assert model_keys and optim_keys
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
