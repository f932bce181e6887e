"""The one error of the checkpoint package: a checkpoint that cannot be used (``r1mega.cli.exits``: exit 2)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: says which folder or file and why."""
