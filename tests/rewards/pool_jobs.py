"""Job functions for the verifier-pool tests: importable by name in the worker processes (``rewards.pool_jobs``)."""

from __future__ import annotations

import os
import signal
import time


def double(x: float) -> float:
    return 2.0 * x


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return 1.0


def sleep_ignoring_timer(seconds: float) -> float:
    """Blocks the worker's timer signal, like C code that never returns to the interpreter."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(seconds)
    return 1.0


def exit_now(code: int) -> float:
    os._exit(code)


def segfault(_: object) -> float:
    """Dies as a segfaulting C extension would (reading address 0 is not reliably fatal in sandboxes)."""
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(10)
    return 1.0


def raise_error(_: object) -> float:
    raise ValueError("boom")


def not_a_number(_: object) -> float:
    return float("nan")


def allocate_mb(mb: int) -> float:
    return float(len(bytearray(mb * 2**20)))


def worker_pid(_: object) -> float:
    return float(os.getpid())
