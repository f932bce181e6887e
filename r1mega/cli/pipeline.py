"""``r1mega-pipeline``: the whole R1 recipe in one command (a Hydra app over ``conf/pipeline/``).

r1mega-pipeline                                  # the tiny default, about 15 minutes on 2 CPU cores
r1mega-pipeline pipeline=tiny run_dir=runs/p2    # another run folder
r1mega-pipeline nproc=2                          # every step under torchrun with 2 processes
r1mega-pipeline -m nproc=1,2                     # one pipeline per job, each in <hydra.sweep.dir>/<job number>

Re-running the same command skips completed steps and resumes an interrupted one.
"""

from __future__ import annotations

import dataclasses
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from r1mega.cli.exits import fail, user_errors
from r1mega.cli.sweeps import enable_r1mega_loggers, job_run_dir
from r1mega.config.errors import ConfigError
from r1mega.config.load import CONFIG_MODULE
from r1mega.pipeline.config import PipelineConfig


def register() -> None:
    """Store the pipeline schema (``r1mega_pipeline_schema``) for ``conf/r1_pipeline.yaml``."""
    ConfigStore.instance().store(name="r1mega_pipeline_schema", node=PipelineConfig)


@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="r1_pipeline", version_base="1.3")
def app(dcfg: DictConfig) -> None:
    """Run the pipeline's steps, then write the report."""
    from r1mega.pipeline.report import write_report
    from r1mega.pipeline.runner import PipelineRunner
    from r1mega.utils.logging import setup_logging

    try:
        cfg: PipelineConfig = OmegaConf.to_object(dcfg)
    except ConfigError as e:
        fail(e, "r1mega-pipeline")
    cfg = dataclasses.replace(cfg, run_dir=job_run_dir(cfg.run_dir))  # a multirun job's own folder
    enable_r1mega_loggers()
    setup_logging("INFO")
    runner = PipelineRunner(cfg)
    with user_errors("r1mega-pipeline"):
        manifests = runner.run()
    if cfg.report:
        path = write_report(manifests, f"{cfg.run_dir}/report", compare=cfg.compare)
        print(f"r1mega-pipeline: done; report at {path}", file=sys.stderr)


def main() -> None:
    """Console entry point."""
    register()
    app()


if __name__ == "__main__":
    main()
