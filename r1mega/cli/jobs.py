"""What r1mega's Hydra apps share (``r1mega-train``, ``r1mega-eval``, ``r1mega-rejection-sample``).

They take the same config (``conf/``, the same overrides), start the processes the same way (torchrun, srun
or one process) and fail in one line with the status of ``r1mega.cli.exits`` (2 for a bad config or bad
data, 3 for a loss that stopped being finite). With ``-m`` (Hydra's multirun) every point of the sweep is checked
first and each job runs in its own run folder (``r1mega.cli.sweeps``); a job that fails is reported by Hydra with
its overrides, the others still run, and the command exits with the first failure's status. Under
hydra-submitit-launcher a job keeps train.sbatch's preemption semantics (``r1mega.cli.submitit_job``).
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from omegaconf import DictConfig

from r1mega.cli import sweeps
from r1mega.cli.exits import exit_code_for, fail, user_errors
from r1mega.cli.submitit_job import submitit_preemption
from r1mega.config.errors import ConfigError
from r1mega.config.load import compose_config, to_typed
from r1mega.config.schema import R1Config
from r1mega.config.store import register_configs

Job = Callable[[R1Config, Any], Any]
"""``job(cfg, ctx)``: runs on every rank between start-up and tear-down."""

HYDRA_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info")
"""Hydra flags that print instead of running: the config is not checked before them."""


def cli_overrides(argv: list[str]) -> list[str]:
    """The Hydra overrides on the command line (not Hydra's own flags or ``hydra.*`` settings)."""
    return [a for a in argv if "=" in a and not a.startswith(("-", "hydra.", "hydra/", "+hydra", "~hydra"))]


def cli_config_name(argv: list[str]) -> str:
    """The ``--config-name``/``-cn`` given on the command line (Hydra's own flag), else ``config``."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config-name="):
            return arg.split("=", 1)[1]
        if arg in ("--config-name", "-cn") and i + 1 < len(argv):
            return argv[i + 1]
    return "config"


def run_job(dcfg: DictConfig, job: Job) -> Any:
    """Type the composed config, start the processes, run ``job`` and tear down; the errors of
    ``r1mega.cli.exits.EXIT_CODES`` exit in one line with their status (in a multirun they are raised for Hydra
    to record against the job, see ``main_for``)."""
    from r1mega.utils.logging import setup_logging

    errors = nullcontext if sweeps.in_multirun() else user_errors
    with errors():
        cfg = to_typed(dcfg)
    cfg = dataclasses.replace(cfg, run_dir=sweeps.job_run_dir(cfg.run_dir))
    sweeps.enable_r1mega_loggers()
    setup_logging(cfg.logging.level)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from r1mega.parallel import bootstrap

    launch = bootstrap.read_launch_env()
    if launch.world_size > 1:
        launch = dataclasses.replace(launch, master_port=launch.master_port + sweeps.job_port_offset())
    with submitit_preemption():
        try:
            with errors():
                ctx = bootstrap.initialize(cfg, launch)
                return job(cfg, ctx)
        finally:
            bootstrap.destroy()


def _precheck(argv: list[str]) -> None:
    """Compose and validate the config (every job of a sweep) and exit in one line if it cannot run."""
    overrides, config_name = cli_overrides(argv), cli_config_name(argv)
    try:
        if sweeps.is_multirun(argv):
            sweeps.check_sweep(overrides, config_name)
        else:
            sweeps.refuse_sweep_without_multirun(overrides)
            compose_config(overrides, config_name=config_name)
    except ConfigError as e:
        fail(e)


def main_for(app: Callable[[], None]) -> None:
    """Console entry point of a Hydra app: reject a bad config in one line before Hydra starts; after a multirun
    whose jobs failed, exit with the first failure's status from ``r1mega.cli.exits``."""
    from r1mega.utils.logging import quiet_known_warnings

    quiet_known_warnings()  # before the app imports megatron-core (r1mega-eval printed its TE/Apex fallbacks)
    register_configs()
    argv = sys.argv[1:]
    if not any(a in HYDRA_INFO_FLAGS for a in argv):
        _precheck(argv)
    if not sweeps.is_multirun(argv):
        app()
        return
    try:
        app()
    except SystemExit as stop:  # Hydra printed the failed job's overrides and error, then exited 1
        error = stop.__context__
        if stop.code == 1 and error is not None and exit_code_for(error) is not None:
            fail(error)
        raise
    except Exception as error:  # HYDRA_FULL_ERROR=1: Hydra re-raises the job's error
        fail(error)
