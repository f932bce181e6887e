"""Rank-aware logging: rank 0 logs at the configured level, other ranks only warnings and errors."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s [r1mega%(rank)s] %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = _rank()
        record.rank = f" rank {rank}" if rank else ""
        return rank == 0 or record.levelno >= logging.WARNING


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def setup_logging(level: str = "INFO") -> None:
    """Configure the ``r1mega`` logger once: one stream handler, rank-filtered."""
    root = logging.getLogger("r1mega")
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.propagate = False


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``r1mega`` hierarchy."""
    return logging.getLogger(name if name.startswith("r1mega") else f"r1mega.{name}")
