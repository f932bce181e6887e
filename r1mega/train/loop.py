"""The one training loop every stage shares: build, step, log."""

from __future__ import annotations

import math
import time

from r1mega.config.schema import R1Config
from r1mega.models.builder import build_model, transformer_config
from r1mega.parallel.bootstrap import ParallelContext
from r1mega.stages import get_stage
from r1mega.train.metrics import MetricsWriter
from r1mega.train.step import Trainer, build_trainer, train_step
from r1mega.utils.logging import get_logger

log = get_logger(__name__)


class NonFiniteError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


def setup(cfg: R1Config, ctx: ParallelContext) -> Trainer:
    """Build the model chunks and wrap them with optimizer and schedule."""
    config = transformer_config(cfg)
    chunks = build_model(cfg, config)
    return build_trainer(cfg, config, chunks, ctx.data_parallel_size)


def train(cfg: R1Config, ctx: ParallelContext) -> list[dict[str, float]]:
    """Run ``optim.train_steps`` steps of the configured stage; returns the per-step metrics."""
    trainer = setup(cfg, ctx)
    stage = get_stage(cfg.stage.name)(cfg)
    metrics = MetricsWriter(cfg, ctx)
    history: list[dict[str, float]] = []
    bad_in_a_row = 0
    tokens_per_step = cfg.optim.global_batch_size * cfg.data.seq_length
    for step in range(cfg.optim.train_steps):
        start = time.perf_counter()
        m = train_step(trainer, stage.batches(step), stage.forward_step())
        m["tokens_per_s"] = tokens_per_step / (time.perf_counter() - start)
        bad_in_a_row = bad_in_a_row + 1 if m["skipped"] else 0
        if bad_in_a_row >= cfg.stage.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (last at step {step}); "
                "weights were not updated by them. Lower optim.lr or check the data."
            )
        history.append(m)
        metrics.log(step + 1, m)
    metrics.close()
    final = history[-1] if history else {}
    if final and not math.isfinite(final.get("lm_loss", 0.0)):
        log.warning("final loss is not finite")
    return history
