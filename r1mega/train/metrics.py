"""Metrics at fixed points of the loop: TensorBoard scalars and a rank-0 progress bar."""

from __future__ import annotations

import os

from r1mega.config.schema import R1Config
from r1mega.parallel.bootstrap import ParallelContext
from r1mega.utils.logging import get_logger

log = get_logger(__name__)


class MetricsWriter:
    """Writes scalars under ``<run_dir>/tb`` and drives the progress bar; silent off rank 0."""

    def __init__(self, cfg: R1Config, ctx: ParallelContext, initial_step: int = 0) -> None:
        self.cfg = cfg
        self.active = ctx.is_main
        self.tb: object | None = None
        self.bar: object | None = None
        if not self.active:
            return
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.run_dir, "tb"))
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.optim.train_steps, initial=initial_step, desc=cfg.stage.name, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record one step's metrics."""
        if not self.active:
            return
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"{self.cfg.stage.name}/{key}", value, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{metrics.get('lm_loss', float('nan')):.4f}",
                lr=f"{metrics.get('lr', 0.0):.2e}",
                tok_s=f"{metrics.get('tokens_per_s', 0.0):.0f}",
            )
        if step % self.cfg.logging.log_interval == 0 and self.bar is None:
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
