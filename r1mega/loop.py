"""The one training loop every stage shares: build, resume, step, evaluate, checkpoint, log.

Side concerns are components called at fixed points: ``CheckpointManager`` (resume at the start, save at
intervals, on preemption and at the end), ``PreemptionHandler`` (SIGTERM/SIGUSR1 -> checkpoint at the
next step boundary, then a clean exit) and ``MetricsWriter`` (TensorBoard and the progress bar).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from r1mega.checkpoint.manager import CheckpointManager
from r1mega.config.schema import R1Config
from r1mega.models.builder import transformer_config
from r1mega.parallel.bootstrap import ParallelContext
from r1mega.stages import get_stage
from r1mega.stages.base import Stage
from r1mega.train.metrics import MetricsWriter
from r1mega.train.signals import PreemptionHandler
from r1mega.train.step import Trainer, build_trainer
from r1mega.utils.faults import kill_point
from r1mega.utils.logging import get_logger

log = get_logger(__name__)


class NonFiniteError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


@dataclass
class RunResult:
    """How a call to ``train`` ended."""

    step: int
    """Optimizer steps completed (including those of resumed runs)."""
    preempted: bool = False
    """Stopped early by a signal, after saving a checkpoint."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Metrics of the steps run in this call."""


def setup(cfg: R1Config, ctx: ParallelContext) -> tuple[Trainer, Stage]:
    """The configured stage (its data read and checked first), its model chunks wrapped with optimizer and schedule,
    and the stage bound to them (see ``r1mega.stages.base`` for the order of the hooks)."""
    stage = get_stage(cfg.stage.name)(cfg, ctx)
    try:
        config = transformer_config(cfg)
        trainer = build_trainer(cfg, config, stage.build_model(config), ctx.data_parallel_size)
        stage.bind(trainer)
    except BaseException:
        stage.close()
        raise
    return trainer, stage


def _resume(cfg: R1Config, trainer: Trainer, stage: Stage, checkpoints: CheckpointManager) -> int:
    """Continue from this run's newest complete checkpoint, or start from ``checkpoint.load``'s weights."""
    latest = checkpoints.latest() if cfg.checkpoint.resume else None
    if latest is not None:
        step, stage_state = checkpoints.load(latest, trainer)
        stage.load_state_dict(stage_state)
        return step
    if cfg.checkpoint.load:
        stage.load_weights(trainer.model, cfg.checkpoint.load)
        # bf16/fp16 optimizers hold fp32 main copies made from the initialisation when they were built: copy the
        # loaded weights into them, or the first update writes the initialisation back over the loaded model.
        trainer.optimizer.reload_model_params()
        log.info("initialised weights from %s", cfg.checkpoint.load)
    return 0


def train(cfg: R1Config, ctx: ParallelContext) -> RunResult:
    """Run the configured stage up to ``optim.train_steps`` steps, resuming if a checkpoint exists."""
    trainer, stage = setup(cfg, ctx)
    with contextlib.closing(stage):  # the stage's workers stop however the run ends
        checkpoints = CheckpointManager(cfg)
        if ctx.is_main:
            _write_resolved_config(cfg)
        step = _resume(cfg, trainer, stage, checkpoints)
        metrics = MetricsWriter(cfg, ctx, initial_step=step)
        preemption = PreemptionHandler()
        result = RunResult(step=step)
        saved_at = step if step else -1  # a resumed run's checkpoint holds its first step's weights
        bad_in_a_row = 0
        try:
            while step < cfg.optim.train_steps:
                start = time.perf_counter()
                m = stage.train_step(trainer, step)
                m["tokens_per_s"] = stage.tokens_per_step() / (time.perf_counter() - start)
                step += 1
                kill_point("train_step", step)
                bad_in_a_row = bad_in_a_row + 1 if m["skipped"] else 0
                if bad_in_a_row >= cfg.stage.max_consecutive_nonfinite:
                    raise NonFiniteError(
                        f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (last at step {step}); "
                        "they did not update the weights. Lower optim.lr or check the data."
                    )
                if cfg.stage.eval_interval and step % cfg.stage.eval_interval == 0:
                    m.update(stage.evaluate(trainer))
                result.history.append(m)
                metrics.log(step, m)
                interval = cfg.checkpoint.save_interval
                if preemption.should_stop():
                    checkpoints.save(step, trainer, stage.state_dict())
                    saved_at, result.preempted = step, True
                    log.warning("checkpointed step %d after a stop request; exiting", step)
                    break
                if interval and step % interval == 0 and step < cfg.optim.train_steps:
                    checkpoints.save(step, trainer, stage.state_dict())
                    saved_at = step
            else:
                if step > saved_at:  # the final weights, unless already saved
                    checkpoints.save(step, trainer, stage.state_dict())
        finally:
            preemption.close()
            metrics.close()
    result.step = step
    return result


def _write_resolved_config(cfg: R1Config) -> None:
    """``<run_dir>/config.yaml``: the resolved config of this run, rewritten at every (re)start."""
    path = Path(cfg.run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
