"""``r1mega-train``: the Hydra app for every stage.

r1mega-train                                   # tiny DeepSeek-V3-style model, one process
torchrun --nproc-per-node 2 -m r1mega.cli.train parallel=tp2
srun -n 2 r1mega-train parallel=ep2            # Slurm, no torchrun needed
"""

from __future__ import annotations

import sys
import warnings

import hydra
from omegaconf import DictConfig

from r1mega.config.errors import ConfigError
from r1mega.config.load import CONFIG_MODULE, compose_config, exit_on_config_error, to_typed
from r1mega.config.store import register_configs


def _overrides(argv: list) -> list:
    """The Hydra overrides on the command line (not Hydra's own flags or ``hydra.*`` settings)."""
    return [a for a in argv if "=" in a and not a.startswith(("-", "hydra.", "hydra/", "+hydra", "~hydra"))]


@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")
def app(dcfg: DictConfig) -> None:
    """Run the configured stage."""
    from r1mega.utils.logging import setup_logging

    try:
        cfg = to_typed(dcfg)
    except ConfigError as e:
        exit_on_config_error(e)
    setup_logging(cfg.logging.level)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from r1mega.parallel import bootstrap
    from r1mega.train.loop import NonFiniteError, train
    from r1mega.train.signals import PREEMPTED_EXIT_CODE

    try:
        ctx = bootstrap.initialize(cfg)
    except ConfigError as e:
        exit_on_config_error(e)
    from r1mega.checkpoint.manager import CheckpointError
    from r1mega.data.prompts import PromptDataError
    from r1mega.data.sft import SFTDataError
    from r1mega.data.tokenizer import TokenizerError

    try:
        result = train(cfg, ctx)
        if result.preempted:
            print(f"r1mega: stopped at step {result.step} on request; checkpoint saved", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT_CODE)
    except ConfigError as e:
        exit_on_config_error(e)
    except (SFTDataError, PromptDataError, TokenizerError, CheckpointError) as e:
        print(f"r1mega: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"r1mega: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        bootstrap.destroy()


def _config_name(argv: list) -> str:
    """The ``--config-name``/``-cn`` given on the command line (Hydra's own flag), else ``config``."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config-name="):
            return arg.split("=", 1)[1]
        if arg in ("--config-name", "-cn") and i + 1 < len(argv):
            return argv[i + 1]
    return "config"


def main() -> None:
    """Console entry point: reject a bad config in one line before Hydra starts the job."""
    register_configs()
    if not any(a in ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info") for a in sys.argv[1:]):
        try:
            compose_config(_overrides(sys.argv[1:]), config_name=_config_name(sys.argv[1:]))
        except ConfigError as e:
            exit_on_config_error(e)
    app()


if __name__ == "__main__":
    main()
