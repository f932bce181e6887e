"""Run a script as N real processes over gloo, in fresh interpreters, with a timeout.

megatron-core keeps MoE state on classes between models and a failed rank leaves its peers waiting in
a collective forever, so every multi-process case gets fresh processes and a hard deadline.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """This process's environment plus torchrun's variables for ``rank`` of ``world_size``."""
    return dict(
        os.environ,
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )


def run_ranks(script: str, args: Sequence[str], world_size: int, timeout: float = 240) -> list[str]:
    """Start ``world_size`` ranks of ``python script args`` with torchrun's variables; return their stdout.

    Raises AssertionError with every rank's output if any rank fails or the deadline passes.
    """
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(rank_env(rank, world_size, port), PYTHONWARNINGS="ignore")
        procs.append(
            subprocess.Popen(
                [sys.executable, script, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs, failed = [], False
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
            out += f"\n[timed out after {timeout}s]"
            failed = True
        failed |= proc.returncode != 0
        outputs.append(out)
    if failed:
        joined = "\n".join(f"--- rank {i} ---\n{o[-4000:]}" for i, o in enumerate(outputs))
        raise AssertionError(f"{script} failed:\n{joined}")
    return outputs
