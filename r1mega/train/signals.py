"""Preemption: SIGTERM or SIGUSR1 (Slurm's warning signal) asks for a checkpoint at the next step boundary."""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

from r1mega.utils.logging import get_logger

log = get_logger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Records a stop request; ``should_stop`` agrees on it across ranks (one all-reduce per step)."""

    def __init__(self) -> None:
        self.requested = False
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.received = signum
        log.warning("received %s: will checkpoint and stop at the next step boundary", signal.Signals(signum).name)

    def should_stop(self) -> bool:
        """True on every rank if any rank was signalled."""
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if torch.cuda.is_available():
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
