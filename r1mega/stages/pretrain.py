"""Next-token prediction on the configured data source (the smoke run and the tiny pipeline's base model)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from megatron.core import parallel_state

from r1mega.config.schema import R1Config
from r1mega.data.synthetic import synthetic_microbatches
from r1mega.train.step import Batch, lm_forward_step


class PretrainStage:
    """Language-model loss on every token."""

    report_keys: Sequence[str] = ("lm_loss",)

    def __init__(self, cfg: R1Config) -> None:
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
