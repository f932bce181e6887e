"""Hydra multirun (``-m``) for r1mega's Hydra apps: every point of a sweep is checked before any job runs, and
every job gets its own run folder.

    r1mega-train -m optim.lr=1e-3,3e-4 seed=1,2               # 4 jobs, one after the other, in this process
    r1mega-train -m hydra/launcher=submitit_slurm ...          # one Slurm job (array task) per point

The run folder rule: in a multirun, a job's ``run_dir`` is its own Hydra output folder,
``<hydra.sweep.dir>/<hydra.sweep.subdir>`` (r1mega's defaults: ``runs/multirun/<date>_<time>/<job number>``), unless
the job's overrides set ``run_dir`` themselves (a sweep over ``run_dir=a,b``). A single ``run_dir=X`` given to a
sweep of several jobs is refused: they would write over each other's checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from r1mega.config.errors import ConfigError

MULTIRUN_FLAGS = ("-m", "--multirun")
"""Hydra's own flags that turn a command into a sweep."""


def is_multirun(argv: Sequence[str]) -> bool:
    """True when the command line asks Hydra for a multirun (``-m``, ``--multirun``, ``hydra.mode=MULTIRUN``)."""
    return any(a in MULTIRUN_FLAGS or a == "hydra.mode=MULTIRUN" for a in argv)


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun, whatever the launcher."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def override_key(override: str) -> str:
    """The dotted key an override sets (``+optim.lr=1`` -> ``optim.lr``; ``~run_dir`` -> ``run_dir``)."""
    return override.split("=", 1)[0].lstrip("+~")


def _parse(overrides: Sequence[str], config_loader: object = None) -> list:
    """Hydra's parsed overrides; a malformed one is a ``ConfigError`` that names it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create(config_loader=config_loader)
    parsed = []
    for item in overrides:
        try:
            parsed.extend(parser.parse_overrides([item]))
        except HydraException as e:
            raise ConfigError(override_key(item), item, str(e).splitlines()[0]) from None
    return parsed


def sweeps_in(overrides: Sequence[str]) -> list[str]:
    """The overrides that are sweeps (``optim.lr=1e-3,1e-4``, ``seed=range(1,4)``, ``model=glob(*)``)."""
    return [item for item, parsed in zip(overrides, _parse(overrides), strict=True) if parsed.is_sweep_override()]


def sweep_jobs(overrides: Sequence[str]) -> list[list[str]]:
    """The overrides of every job of a sweep, in the order and numbering of Hydra's basic sweeper (the cartesian
    product of the swept values; ``glob(...)`` lists the presets of ``conf/``)."""
    from hydra import initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from r1mega.config.load import CONFIG_MODULE

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        parsed = _parse(overrides, GlobalHydra.instance().config_loader())
        try:
            (jobs,) = BasicSweeper.split_arguments(parsed, None)
        except HydraException as e:  # a sweep the basic sweeper cannot list (interval(...))
            raise ConfigError("overrides", list(overrides), str(e).splitlines()[0]) from None
    return jobs


def check_sweep(overrides: Sequence[str], config_name: str) -> int:
    """Compose and validate the config of every job of a ``-m`` sweep; returns the number of jobs.

    Raises ``ConfigError`` naming the first job that cannot run, or a ``run_dir`` that several jobs would share.
    """
    from r1mega.config.load import compose_config

    jobs = sweep_jobs(overrides)
    run_dirs = [[o.split("=", 1)[1] for o in job if override_key(o) == "run_dir" and "=" in o] for job in jobs]
    if len(jobs) > 1 and run_dirs[0] and all(r == run_dirs[0] for r in run_dirs):
        raise ConfigError(
            "run_dir",
            run_dirs[0][-1],
            f"no run_dir for a sweep of {len(jobs)} jobs (each job runs in <hydra.sweep.dir>/<job number>; "
            "choose the sweep's folder with hydra.sweep.dir=...), or one run_dir per job (run_dir=a,b)",
        )
    for number, job in enumerate(jobs):
        try:
            compose_config(job, config_name=config_name)
        except ConfigError as e:
            raise ConfigError(e.key, e.value, f"{e.valid} (sweep job #{number}: {' '.join(job)})") from None
    return len(jobs)


def refuse_sweep_without_multirun(overrides: Sequence[str]) -> None:
    """A sweep value in a single run: say how to run it (Hydra alone says "Ambiguous value")."""
    swept = sweeps_in(overrides)
    if swept:
        key, _, value = swept[0].partition("=")
        raise ConfigError(override_key(key), value, "one value; to run one job per value, add -m (Hydra's --multirun)")


def job_run_dir(run_dir: str) -> str:
    """This Hydra job's run folder: ``run_dir`` in a single run; in a multirun the job's own output folder under
    ``hydra.sweep.dir``, unless the job's overrides set ``run_dir`` (see the module docstring)."""
    from hydra.core.hydra_config import HydraConfig

    if not in_multirun():
        return run_dir
    hydra = HydraConfig.get()
    if any(override_key(o) == "run_dir" for o in hydra.overrides.task):
        return run_dir
    return str(hydra.runtime.output_dir)


def job_port_offset() -> int:
    """How far this job's rendezvous port sits from the launcher's: the job number in a multirun, else 0.

    The jobs of a local multirun run one after the other in the same processes; when those are several ranks
    (torchrun, srun), a job that reopened the previous job's rendezvous port found its stale addresses (gloo:
    "connectFullMesh failed ... Connection refused"). Each job rendezvous on its own port instead."""
    from hydra.core.hydra_config import HydraConfig

    return int(HydraConfig.get().job.num) if in_multirun() else 0


def enable_r1mega_loggers() -> None:
    """Hydra's job logging (``hydra/job_logging: disabled``) disables every logger that exists when a job starts:
    in a multirun, every job after the first would log nothing. Turn r1mega's back on."""
    for name, logger in logging.Logger.manager.loggerDict.items():
        if name.startswith("r1mega") and isinstance(logger, logging.Logger):
            logger.disabled = False
