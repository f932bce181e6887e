"""Run a script as N real processes over gloo, with a timeout.

megatron-core keeps MoE state on classes between models and a failed rank leaves its peers waiting in
a collective forever, so every multi-process case gets new processes (forks of the test zygote, which has
only imported modules: see ``zygote``) and a hard deadline.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from zygote import spawn


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nobody listens on now, below the system's ephemeral range.

    ``bind(0)`` hands out ports from that range, and so does every outgoing connection for its source port:
    with gloo's meshes opening connections in parallel tests, a port freed here was taken before the rank that
    was to listen on it started (EADDRINUSE in CI). Below the range only another listener can take it."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(15000, low - 64)  # room for a sweep's per-job offsets above the port
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 15000..{low - 64}")


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


ADDRESS_IN_USE = "EADDRINUSE"
"""What a rank's rendezvous prints when another process listens on its port first."""


def run_ranks(script: str, args: Sequence[str], world_size: int, timeout: float = 240, attempts: int = 3) -> list[str]:
    """Start ``world_size`` ranks of ``python script args`` with torchrun's variables; return their stdout.

    Raises AssertionError with every rank's output if any rank fails or the deadline passes. A run whose
    rendezvous port was taken by another process first (EADDRINUSE) starts again on a new port, up to
    ``attempts`` times.
    """
    for _ in range(attempts - 1):
        try:
            return _run_ranks_once(script, args, world_size, timeout)
        except AssertionError as e:
            if ADDRESS_IN_USE not in str(e):
                raise
    return _run_ranks_once(script, args, world_size, timeout)


def _run_ranks_once(script: str, args: Sequence[str], world_size: int, timeout: float) -> list[str]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="r1mega-ranks-") as tmp:
        logs = [Path(tmp) / f"rank{rank}.log" for rank in range(world_size)]
        procs = [
            spawn([script, *args], dict(rank_env(rank, world_size, port), PYTHONWARNINGS="ignore"), logs[rank])
            for rank in range(world_size)
        ]
        deadline = time.monotonic() + timeout
        failed = False
        for proc in procs:
            try:
                failed |= proc.wait(timeout=max(deadline - time.monotonic(), 1)) != 0
            except subprocess.TimeoutExpired:
                failed = True
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # a rank left waiting in a collective, or its helpers
            except ProcessLookupError:
                pass
        outputs = [log.read_text() for log in logs]
    if failed:
        codes = [proc.returncode for proc in procs]
        joined = "\n".join(
            f"--- rank {i} (rc={c}) ---\n{o[-4000:]}" for i, (c, o) in enumerate(zip(codes, outputs, strict=True))
        )
        raise AssertionError(f"{script} failed (or passed its {timeout}s deadline):\n{joined}")
    return outputs
