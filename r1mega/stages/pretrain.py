"""Next-token prediction on the configured data source (the smoke run and the tiny pipeline's base model)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from megatron.core import parallel_state

from r1mega.config.schema import R1Config
from r1mega.data.synthetic import synthetic_microbatches
from r1mega.parallel.bootstrap import ParallelContext
from r1mega.train.step import Batch, Trainer, forward_backward, lm_forward_step


class PretrainStage:
    """Language-model loss on every token of a deterministic stream (its position is the step)."""

    report_keys: Sequence[str] = ("lm_loss",)

    def __init__(self, cfg: R1Config, ctx: ParallelContext) -> None:
        self.cfg = cfg

    def batches(self, step: int) -> Iterator[Batch]:
        c = self.cfg
        return synthetic_microbatches(
            c.optim.micro_batch_size,
            c.data.seq_length,
            c.model.vocab_size,
            c.data.seed,
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
            step,
        )

    def forward_step(self) -> Callable:
        return lm_forward_step

    def tokens_per_step(self) -> int:
        return self.cfg.optim.global_batch_size * self.cfg.data.seq_length

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Loss on a held-out slice of the stream (steps far beyond any training step)."""
        metrics = forward_backward(trainer, self.batches(10**9), forward_only=True)
        return {"eval_lm_loss": metrics["lm_loss"]}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
