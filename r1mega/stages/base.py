"""The one contract between a stage and the shared training loop (``r1mega.loop.train``).

A stage is a small class. The loop calls its hooks in this order, and nothing else on it::

    stage = StageClass(cfg, ctx)                  # read and check the data: fails before any model is built
    chunks = stage.build_model(config)            # default: the policy language model
    trainer = build_trainer(..., chunks, ...)     # wrapping, optimizer, schedule
    stage.bind(trainer)                           # default: nothing (GRPO: rollout engine, reference model)
    stage.load_state_dict(...)                    # resuming a run's checkpoint, or else
    stage.load_weights(trainer.model, path)       # starting from checkpoint.load (default: policy weights)
    per step:  metrics = stage.train_step(trainer, step); stage.tokens_per_step()
    every stage.eval_interval steps: stage.evaluate(trainer)
    at each checkpoint: stage.state_dict()
    at the end, however it ends: stage.close()

Every hook but ``train_step`` and ``tokens_per_step`` has a default. ``BatchStage`` is the common kind
(pretrain, SFT, reward model): its step is one optimizer update over micro-batches it makes, so it gives
``batches`` and ``forward_step`` and inherits ``train_step``. A stage that makes its own updates (GRPO: rollout,
reward, several updates per step) subclasses ``Stage`` and writes ``train_step``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from r1mega.checkpoint.weights import load_weights
from r1mega.config.schema import R1Config
from r1mega.models.builder import build_model
from r1mega.parallel.bootstrap import ParallelContext
from r1mega.train.step import Batch, Trainer, train_step

ForwardStep = Callable[[Iterator[Batch], torch.nn.Module], tuple[torch.Tensor, Callable]]
"""megatron's forward-step function: (data iterator, model chunk) -> (output, loss function of the output)."""


class Stage(ABC):
    """A stage of the R1 recipe: its data, its step and its metrics; the loop does the rest."""

    report_keys: ClassVar[Sequence[str]] = ("lm_loss",)
    """(total, count) reports the forward step returns; the shared step logs their token means."""

    def __init__(self, cfg: R1Config, ctx: ParallelContext) -> None:
        self.cfg = cfg
        self.ctx = ctx

    def build_model(self, config: TransformerConfig) -> list[torch.nn.Module]:
        """This rank's model chunks, unwrapped (the loop adds Float16Module and DDP). Default: the policy LM."""
        return build_model(self.cfg, config)

    def load_weights(self, chunks: list[torch.nn.Module], path: str) -> None:
        """Initialise from ``checkpoint.load`` when no checkpoint of this run exists (collective)."""
        load_weights(chunks, path, verify=self.cfg.checkpoint.verify)

    def bind(self, trainer: Trainer) -> None:  # noqa: B027 (an optional hook: doing nothing is the default)
        """Attach to the built trainer, before any checkpoint is loaded into it."""

    @abstractmethod
    def train_step(self, trainer: Trainer, step: int) -> dict[str, float]:
        """Optimizer step ``step`` (0-based): its metrics, with ``skipped`` (1.0 if a non-finite step was skipped)."""

    @abstractmethod
    def tokens_per_step(self) -> int:
        """Tokens the last step processed over all ranks (for tokens/s)."""

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Held-out metrics, every ``stage.eval_interval`` steps. Default: none."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable data position, saved in every checkpoint. Default: none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore what ``state_dict`` returned, when resuming."""

    def close(self) -> None:  # noqa: B027
        """Release what the stage started (worker processes); called however the run ends."""


class BatchStage(Stage):
    """A stage whose step is one optimizer update over the micro-batches it makes (pretrain, SFT, reward model)."""

    @abstractmethod
    def batches(self, step: int) -> Iterator[Batch]:
        """This data-parallel rank's micro-batches for optimizer step ``step``."""

    @abstractmethod
    def forward_step(self) -> ForwardStep:
        """The megatron forward-step function for these batches."""

    def train_step(self, trainer: Trainer, step: int) -> dict[str, float]:
        """One update over ``batches(step)`` with ``forward_step()`` (the shared megatron step)."""
        return train_step(trainer, self.batches(step), self.forward_step(), keys=self.report_keys)
