"""What r1mega's Hydra apps share (``r1mega-train``, ``r1mega-eval``, ``r1mega-rejection-sample``).

They take the same config (``conf/``, the same overrides), start the processes the same way (torchrun, srun
or one process) and fail in one line with the status of ``r1mega.cli.exits`` (2 for a bad config or bad
data, 3 for a loss that stopped being finite).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from r1mega.cli.exits import fail, user_errors
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
    ``r1mega.cli.exits.EXIT_CODES`` exit in one line with their status."""
    from r1mega.utils.logging import setup_logging

    with user_errors():
        cfg = to_typed(dcfg)
    setup_logging(cfg.logging.level)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from r1mega.parallel import bootstrap

    try:
        with user_errors():
            ctx = bootstrap.initialize(cfg)
            return job(cfg, ctx)
    finally:
        bootstrap.destroy()


def main_for(app: Callable[[], None]) -> None:
    """Console entry point of a Hydra app: reject a bad config in one line before Hydra starts."""
    register_configs()
    argv = sys.argv[1:]
    if not any(a in HYDRA_INFO_FLAGS for a in argv):
        try:
            compose_config(cli_overrides(argv), config_name=cli_config_name(argv))
        except ConfigError as e:
            fail(e)
    app()
