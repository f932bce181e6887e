"""Supervised fine-tuning: cold start on ``<think>`` chain-of-thought, rejection-sampled data, distillation.

Chat JSONL is rendered through the tokenizer's chat template with loss only on the assistant's tokens,
packed into rows with per-document attention and positions, and sampled deterministically and
resumably (the sampler's position is saved in every checkpoint). Held-out loss every
``stage.eval_interval`` steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, ClassVar

import torch

from r1mega.config.errors import ConfigError
from r1mega.config.schema import R1Config
from r1mega.data.sft import PackedSequence, SFTSampler, load_sft_rows, make_batch
from r1mega.data.tokenizer import load_model_tokenizer, pad_token_id
from r1mega.models.builder import use_transformer_engine
from r1mega.parallel.bootstrap import ParallelContext
from r1mega.stages.base import BatchStage, ForwardStep
from r1mega.train.step import Batch, Trainer, forward_backward, lm_loss
from r1mega.utils.logging import get_logger

log = get_logger(__name__)


def sft_forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
    """Like the LM forward step, with the per-document attention mask of packed rows."""
    batch = next(data_iterator)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch["attention_mask"],
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    return output, partial(lm_loss, batch["loss_mask"])


class SFTStage(BatchStage):
    """Masked next-token loss on assistant turns of chat data."""

    report_keys: ClassVar[Sequence[str]] = ("lm_loss",)

    def __init__(self, cfg: R1Config, ctx: ParallelContext) -> None:
        super().__init__(cfg, ctx)
        d = cfg.data
        if d.packing and use_transformer_engine(cfg):
            raise ConfigError(
                "data.packing",
                True,
                "false with Transformer Engine layers for now (TE's causal kernel ignores the "
                "per-document mask; THD packed sequences are not wired yet)",
            )
        self.tokenizer = load_model_tokenizer(d.tokenizer, cfg.model.vocab_size)
        self.pad_id = pad_token_id(self.tokenizer)
        load = partial(
            load_sft_rows,
            tokenizer=self.tokenizer,
            seq_length=d.seq_length,
            packing=d.packing,
            truncation=d.truncation,
            skip_malformed=d.skip_malformed,
        )
        self.rows: list[PackedSequence] = load(d.train_path, seed=d.seed)
        self.eval_rows: list[PackedSequence] = load(d.eval_path) if d.eval_path else []
        dp_rank, dp = ctx.dp_rank, ctx.data_parallel_size
        per_step = cfg.optim.global_batch_size
        if len(self.rows) < per_step:
            raise ConfigError(
                "optim.global_batch_size", per_step, f"at most the {len(self.rows)} rows of {d.train_path}"
            )
        self.sampler = SFTSampler(len(self.rows), seed=d.seed, dp_rank=dp_rank, dp_size=dp)
        self.dp_rank, self.dp = dp_rank, dp
        self.num_microbatches = per_step // (cfg.optim.micro_batch_size * dp)

    def _batches(self, rows: list[PackedSequence], index_groups: list[list[int]]) -> Iterator[Batch]:
        for group in index_groups:
            yield make_batch([rows[i] for i in group], self.cfg.data.seq_length, self.pad_id)

    def batches(self, step: int) -> Iterator[Batch]:
        groups = self.sampler.microbatches(self.cfg.optim.micro_batch_size, self.num_microbatches)
        return self._batches(self.rows, groups)

    def forward_step(self) -> ForwardStep:
        return sft_forward_step

    def tokens_per_step(self) -> int:
        return self.cfg.optim.global_batch_size * self.cfg.data.seq_length

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Token-mean loss over the first ``stage.eval_batches`` micro-batches per DP rank of the held-out split."""
        mbs = self.cfg.optim.micro_batch_size
        count = min(len(self.eval_rows) // (mbs * self.dp), self.cfg.stage.eval_batches)  # the same on every rank
        if count == 0:
            return {}
        groups = [[(k * self.dp + self.dp_rank) * mbs + j for j in range(mbs)] for k in range(count)]
        metrics = forward_backward(
            trainer, self._batches(self.eval_rows, groups), sft_forward_step, forward_only=True, num_microbatches=count
        )
        return {"eval_loss": metrics["lm_loss"]}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
