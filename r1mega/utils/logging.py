"""Rank-aware logging: rank 0 logs at the configured level, other ranks only warnings and errors."""

from __future__ import annotations

import logging
import os
import sys
import warnings

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


QUIET_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # megatron-core 0.16.1 warns on every TransformerConfig about a CUDA-graph option r1mega never sets.
    (r"full scope is deprecated", UserWarning),
    # Optional GPU extras that r1mega detects at run time and falls back from on purpose.
    (r".*(Apex|Transformer Engine).*(not installed|Falling back)", UserWarning),
    # torch.distributed.checkpoint deprecations that megatron-core's loader triggers on every load.
    (r"`load_state_dict` is deprecated", FutureWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
)
"""Third-party warnings that tell a user nothing they can act on: (message regex, category). Others still show."""


def quiet_known_warnings() -> None:
    """Ignore ``QUIET_WARNINGS`` in this process (every entry point calls it through ``setup_logging``)."""
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def setup_logging(level: str = "INFO") -> None:
    """Configure the ``r1mega`` logger once (one stream handler, rank-filtered) and quiet ``QUIET_WARNINGS``."""
    quiet_known_warnings()
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
