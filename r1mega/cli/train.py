"""``r1mega-train``: the Hydra app for every stage.

r1mega-train                                   # tiny DeepSeek-V3-style model, one process
torchrun --nproc-per-node 2 -m r1mega.cli.train parallel=tp2
srun -n 2 r1mega-train parallel=ep2            # Slurm, no torchrun needed
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from r1mega.cli.exits import ExitCode
from r1mega.cli.jobs import main_for, run_job
from r1mega.config.load import CONFIG_MODULE
from r1mega.config.schema import R1Config


def _train(cfg: R1Config, ctx) -> None:
    from r1mega.loop import train

    result = train(cfg, ctx)
    if result.preempted:
        print(f"r1mega: stopped at step {result.step} on request; checkpoint saved", file=sys.stderr)
        sys.exit(ExitCode.PREEMPTED)
    if cfg.eval.after_training:
        _evaluate_final(cfg, ctx)


def _evaluate_final(cfg: R1Config, ctx) -> None:
    """R1's evaluation of the run's newest checkpoint (``eval.*``), in these processes (collective)."""
    import dataclasses
    from pathlib import Path

    from r1mega.eval.run import run_evaluation

    checkpoints = cfg.checkpoint.dir or str(Path(cfg.run_dir) / "checkpoints")
    output_dir = cfg.eval.output_dir or str(Path(cfg.run_dir) / "eval")
    run_evaluation(
        dataclasses.replace(
            cfg,
            checkpoint=dataclasses.replace(cfg.checkpoint, load=checkpoints),
            eval=dataclasses.replace(cfg.eval, output_dir=output_dir),
        ),
        ctx,
    )


@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")
def app(dcfg: DictConfig) -> None:
    """Run the configured stage."""
    run_job(dcfg, _train)


def main() -> None:
    """Console entry point: reject a bad config in one line before Hydra starts the job."""
    main_for(app)


if __name__ == "__main__":
    main()
