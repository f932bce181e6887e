"""What the Hydra apps of the generation jobs share (``r1mega-eval``, ``r1mega-rejection-sample``).

They take the training config (``conf/``, the same overrides as ``r1mega-train``), start the processes the
same way (torchrun, srun or one process) and fail on a bad config or bad data with one line and exit code 2.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from r1mega.cli.train import _config_name, _overrides
from r1mega.config.errors import ConfigError
from r1mega.config.load import compose_config, exit_on_config_error, to_typed
from r1mega.config.schema import R1Config
from r1mega.config.store import register_configs

Job = Callable[[R1Config, Any], Any]
"""``job(cfg, ctx)``: runs on every rank between start-up and tear-down."""


def run_job(dcfg: DictConfig, job: Job) -> Any:
    """Type the composed config, start the processes, run ``job`` and tear down; user errors exit with 2."""
    from r1mega.utils.logging import setup_logging

    try:
        cfg = to_typed(dcfg)
    except ConfigError as e:
        exit_on_config_error(e)
    setup_logging(cfg.logging.level)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from r1mega.checkpoint.manager import CheckpointError
    from r1mega.data.prompts import PromptDataError
    from r1mega.data.tokenizer import TokenizerError
    from r1mega.parallel import bootstrap

    try:
        ctx = bootstrap.initialize(cfg)
        return job(cfg, ctx)
    except ConfigError as e:
        exit_on_config_error(e)
    except (PromptDataError, TokenizerError, CheckpointError) as e:
        print(f"r1mega: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        bootstrap.destroy()


def main_for(app: Callable[[], None]) -> None:
    """Console entry point of a job's Hydra app: reject a bad config in one line before Hydra starts."""
    register_configs()
    argv = sys.argv[1:]
    if not any(a in ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info") for a in argv):
        try:
            compose_config(_overrides(argv), config_name=_config_name(argv))
        except ConfigError as e:
            exit_on_config_error(e)
    app()
