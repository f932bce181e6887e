"""Fault injection for the crash-and-resume tests.

``R1MEGA_KILL_AT=<point>:<step>`` makes the process SIGKILL itself when it reaches ``point`` at ``step``
(points: ``train_step`` after an optimizer step, ``checkpoint_write`` after the tensors of a checkpoint
are written but before it is published). Unset in normal runs: one environment lookup per call.
"""

from __future__ import annotations

import os
import signal


def kill_point(name: str, step: int) -> None:
    """SIGKILL this process if the environment asks for a crash here."""
    if os.environ.get("R1MEGA_KILL_AT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
