"""Next-token prediction on the configured data source (the smoke run and the tiny pipeline's base model).

``data.source=synthetic``: a deterministic random stream with a learnable rule. ``data.source=jsonl``: the
chat JSONL corpus rendered with the chat template, packed like SFT data but with the loss on every token
(prompt included): how the tiny pipeline makes its "base model" when no pretrained weights can be fetched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from r1mega.config.schema import R1Config
from r1mega.data.synthetic import synthetic_microbatches
from r1mega.parallel.bootstrap import ParallelContext
from r1mega.stages.base import BatchStage, ForwardStep
from r1mega.stages.sft import SFTStage
from r1mega.train.step import Batch, Trainer, forward_backward, lm_forward_step


class PretrainStage(BatchStage):
    """Language-model loss on every token of a deterministic stream (its position is the step)."""

    report_keys: ClassVar[Sequence[str]] = ("lm_loss",)

    def __init__(self, cfg: R1Config, ctx: ParallelContext) -> None:
        super().__init__(cfg, ctx)
        self.corpus: SFTStage | None = None
        if cfg.data.source == "jsonl":
            self.corpus = SFTStage(cfg, ctx)
            for row in self.corpus.rows + self.corpus.eval_rows:  # loss on every token of every document
                row.loss_mask = [1] * len(row.input_ids)

    def batches(self, step: int) -> Iterator[Batch]:
        if self.corpus is not None:
            return self.corpus.batches(step)
        c = self.cfg
        return synthetic_microbatches(
            c.optim.micro_batch_size,
            c.data.seq_length,
            c.model.vocab_size,
            c.data.seed,
            self.ctx.dp_rank,
            self.ctx.data_parallel_size,
            step,
        )

    def forward_step(self) -> ForwardStep:
        return self.corpus.forward_step() if self.corpus is not None else lm_forward_step

    def tokens_per_step(self) -> int:
        return self.cfg.optim.global_batch_size * self.cfg.data.seq_length

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Loss on a held-out slice of the stream (steps far beyond any training step) or the corpus's eval split."""
        if self.corpus is not None:
            return {"eval_lm_loss": self.corpus.evaluate(trainer).get("eval_loss", float("nan"))}
        metrics = forward_backward(trainer, self.batches(10**9), forward_only=True)
        return {"eval_lm_loss": metrics["lm_loss"]}

    def state_dict(self) -> dict[str, Any]:
        return self.corpus.state_dict() if self.corpus is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.corpus is not None:
            self.corpus.load_state_dict(state)
