"""What a stage gives the shared training loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from r1mega.train.step import Batch


class Stage(Protocol):
    """A stage differs from another in its data and its forward step, not in its loop."""

    report_keys: Sequence[str]
    """(total, count) reports the forward step returns; the loop logs their token means."""

    def batches(self, step: int) -> Iterator[Batch]:
        """This data-parallel rank's micro-batches for optimizer step ``step``."""
        ...

    def forward_step(self) -> Callable:
        """The megatron forward-step function for training."""
        ...
