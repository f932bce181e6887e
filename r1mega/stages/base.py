"""What a stage gives the shared training loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from r1mega.train.step import Batch, Trainer


class Stage(Protocol):
    """A stage differs from another in its data and its forward step, not in its loop.

    Optional class attributes: ``build_model(cfg, config)`` builds the trainer's model chunks instead of
    ``r1mega.models.builder.build_model``, and ``load_weights(chunks, path)`` loads ``checkpoint.load`` instead
    of ``r1mega.checkpoint.weights.load_weights`` (the reward model: a value head on the policy's backbone).
    """

    report_keys: Sequence[str]
    """(total, count) reports the forward step returns; the loop logs their token means."""

    def batches(self, step: int) -> Iterator[Batch]:
        """This data-parallel rank's micro-batches for optimizer step ``step`` (0-based)."""
        ...

    def forward_step(self) -> Callable:
        """The megatron forward-step function for training."""
        ...

    def tokens_per_step(self) -> int:
        """Tokens one optimizer step processes over all ranks (for tokens/s)."""
        ...

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Held-out metrics, called every ``stage.eval_interval`` steps."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable data position, saved in checkpoints."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the data position from a checkpoint."""
        ...


class StepStage(Stage, Protocol):
    """A stage that runs its own optimizer step(s) each loop step (GRPO: rollout, reward, updates).

    The loop calls ``bind(trainer)`` once before any checkpoint is loaded, then ``train_step`` instead of
    the shared ``train_step`` over ``batches``, and ``close`` at the end.
    """

    def bind(self, trainer: Trainer) -> None:
        """Attach to the trainer's model (engines, reference models)."""
        ...

    def train_step(self, trainer: Trainer, step: int) -> dict[str, float]:
        """One loop step; returns its metrics (``skipped`` included)."""
        ...

    def close(self) -> None:
        """Release what the stage started (worker processes)."""
        ...
