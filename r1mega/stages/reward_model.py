"""Reward-model training: a scalar head on the r1mega model, Bradley-Terry loss on preference pairs.

Data: preference JSONL (``r1mega.data.preferences``) in ``data.train_path`` / ``data.eval_path``, rendered with
``data.tokenizer``'s chat template; ``optim.micro_batch_size`` and ``optim.global_batch_size`` count *pairs*
(a micro-batch holds both responses of each of its pairs, padded to its longest row). The model is
``r1mega.models.reward.RewardModel`` (the stage's ``build_model``); ``checkpoint.load`` may name a policy
checkpoint (the SFT model: the backbone loads, the head starts fresh) or a reward-model checkpoint.

Loss per pair (Bradley-Terry), with r the value at the last token of each response::

    loss = -log sigmoid(r_chosen - r_rejected)

reported with the accuracy (share of pairs with r_chosen > r_rejected) and the mean margin r_chosen -
r_rejected, on training batches and every ``stage.eval_interval`` steps on the held-out split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from r1mega.checkpoint.reward import load_reward_weights
from r1mega.config.errors import ConfigError
from r1mega.config.schema import R1Config
from r1mega.data.preferences import TokenizedPair, make_pair_batch, read_preferences, tokenize_pairs
from r1mega.data.sft import SFTSampler
from r1mega.data.tokenizer import load_model_tokenizer, pad_token_id
from r1mega.models.reward import build_reward_model
from r1mega.parallel.bootstrap import ParallelContext
from r1mega.stages.base import BatchStage, ForwardStep
from r1mega.train.step import Batch, Trainer, forward_backward

REPORT_KEYS = ("rm_loss", "rm_accuracy", "rm_margin")


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair ``(m,)``: the loss ``-log sigmoid(chosen - rejected)``, whether ``chosen > rejected`` (0/1) and
    the margin ``chosen - rejected``."""
    margin = chosen.float() - rejected.float()  # (m,)
    return F.softplus(-margin), (margin > 0).float(), margin  # softplus(-x) = -log sigmoid(x), stable


def pair_loss(last: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron loss function over a pair micro-batch: (loss summed over pairs, pair count, reports).

    ``values`` ``(2m, s)`` per-token rewards of rows chosen_0, rejected_0, ...; ``last`` ``(2m,)`` their last tokens.
    """
    rewards = values[torch.arange(len(values), device=values.device), last.to(values.device)]  # (2m,)
    loss, correct, margin = bradley_terry(rewards[0::2], rewards[1::2])
    n = torch.tensor(float(len(loss)), device=loss.device)
    report = {
        key: torch.stack([x.sum().detach(), n]) for key, x in zip(REPORT_KEYS, (loss, correct, margin), strict=True)
    }
    return loss.sum(), n.to(torch.int), report


def rm_forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
    """Values of every token of a pair micro-batch, and the Bradley-Terry loss function."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    values = model(batch["tokens"].to(device), batch["position_ids"].to(device), None)  # (2m, s)
    return values, partial(pair_loss, batch["last"])


class RewardModelStage(BatchStage):
    """Bradley-Terry training of ``RewardModel`` on preference pairs."""

    report_keys: ClassVar[Sequence[str]] = REPORT_KEYS

    def __init__(self, cfg: R1Config, ctx: ParallelContext) -> None:
        super().__init__(cfg, ctx)
        d, p = cfg.data, cfg.parallel
        if p.pipeline_model_parallel_size != 1:
            raise ConfigError(
                "parallel.pipeline_model_parallel_size",
                p.pipeline_model_parallel_size,
                "1 for stage.name=reward_model (pair micro-batches are padded to their own length; use TP/EP)",
            )
        if d.truncation != "drop":
            raise ConfigError(
                "data.truncation", d.truncation, "drop for stage.name=reward_model (the score is read at the end)"
            )
        self.tokenizer = load_model_tokenizer(d.tokenizer, cfg.model.vocab_size)
        self.pad_id = pad_token_id(self.tokenizer)
        self.multiple_of = p.tensor_model_parallel_size if p.sequence_parallel else 1
        load = partial(read_preferences, skip_malformed=d.skip_malformed)
        self.pairs: list[TokenizedPair] = tokenize_pairs(load(d.train_path), self.tokenizer, d.seq_length)
        self.eval_pairs: list[TokenizedPair] = (
            tokenize_pairs(load(d.eval_path), self.tokenizer, d.seq_length) if d.eval_path else []
        )
        self.dp_rank, self.dp = ctx.dp_rank, ctx.data_parallel_size
        per_step = cfg.optim.global_batch_size
        if len(self.pairs) < per_step:
            raise ConfigError(
                "optim.global_batch_size", per_step, f"at most the {len(self.pairs)} pairs of {d.train_path}"
            )
        self.sampler = SFTSampler(len(self.pairs), seed=d.seed, dp_rank=self.dp_rank, dp_size=self.dp)
        self.num_microbatches = per_step // (cfg.optim.micro_batch_size * self.dp)
        self._tokens = 0

    def build_model(self, config: TransformerConfig) -> list[torch.nn.Module]:
        """A reward model (the policy's backbone and a value head), not a language model."""
        return build_reward_model(self.cfg, config)

    def load_weights(self, chunks: list[torch.nn.Module], path: str) -> None:
        """A reward-model checkpoint, or a policy checkpoint's backbone (the head then starts fresh)."""
        load_reward_weights(chunks, path, verify=self.cfg.checkpoint.verify)

    def _batches(self, pairs: list[TokenizedPair], index_groups: list[list[int]]) -> Iterator[Batch]:
        for group in index_groups:
            yield make_pair_batch([pairs[i] for i in group], self.pad_id, self.multiple_of)

    def batches(self, step: int) -> Iterator[Batch]:
        groups = self.sampler.microbatches(self.cfg.optim.micro_batch_size, self.num_microbatches)
        self._tokens = self.dp * sum(len(ids) for g in groups for i in g for ids in self.pairs[i])
        return self._batches(self.pairs, groups)

    def forward_step(self) -> ForwardStep:
        return rm_forward_step

    def tokens_per_step(self) -> int:
        """Tokens of both responses of every pair of the last step (this rank's count times DP)."""
        return self._tokens

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Loss, accuracy and margin over the first ``stage.eval_batches`` micro-batches per DP rank of the
        held-out pairs."""
        mbs = self.cfg.optim.micro_batch_size
        count = min(len(self.eval_pairs) // (mbs * self.dp), self.cfg.stage.eval_batches)  # the same on every rank
        if count == 0:
            return {}
        groups = [[(k * self.dp + self.dp_rank) * mbs + j for j in range(mbs)] for k in range(count)]
        metrics = forward_backward(
            trainer,
            self._batches(self.eval_pairs, groups),
            rm_forward_step,
            forward_only=True,
            keys=REPORT_KEYS,
            num_microbatches=count,
        )
        return {f"eval_{key.removeprefix('rm_')}": value for key, value in metrics.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
