"""Fixtures every test shares."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one torch thread each (and in every process they start), or the workers' thread
    # pools fight over the cores (measured: tests/rollout/test_engine.py 21 s alone, 109 s beside another worker).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _restore_r1mega_logging() -> Iterator[None]:
    """Undo what an in-process entry point's ``setup_logging`` did to the ``r1mega`` logger.

    ``setup_logging`` gives the logger a handler on the ``sys.stderr`` of that moment (pytest's capture, closed
    after the test) and stops propagation, so later tests would log into a closed stream and ``caplog`` would see
    nothing. Each test starts with the logger as it found it.
    """
    logger = logging.getLogger("r1mega")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:] = saved[0]
    logger.propagate, logger.level = saved[1], saved[2]


@pytest.fixture(autouse=True)
def _reset_megatron_moe_loss_scale() -> Iterator[None]:
    """Leave megatron-core's MoE aux-loss backward scale as a fresh process has it (None) after each test.

    megatron keeps it on a class: a backward outside its schedule (tests/train/test_recompute.py) stores a 0-dim
    tensor, into which the schedule's next ``set_loss_scale`` (a (1,)-shaped scale) cannot be copied, so an MoE
    training step run later in the same test process failed. Which tests share a process depends on the order and
    on how pytest-xdist splits the suite, so no test may leave it behind.
    """
    yield
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None


LONGEST_FIRST = (
    "tests/slurm/",
    "tests/pipeline/test_smollm2.py",
    "tests/stages/test_grpo.py",
    "tests/parallel/test_parity.py",
    "tests/checkpoint/test_distributed_optimizer.py",
    "tests/cli/test_sweeps.py",
    "tests/checkpoint/test_resume.py",
    "tests/cli/test_train.py",
    "tests/rollout/test_engine_parallel.py",
    "tests/pipeline/test_runner.py",
    "tests/checkpoint/test_reshard.py",
)
"""Units of work that took a minute or more in a full run on 2 cores (longest first): under pytest-xdist they are
handed out first, so the run does not end with one worker alone on a long unit while the other idles."""


def _unit(nodeid: str) -> str:
    """The unit of work a test belongs to under pytest-xdist: its file, or ``tests/slurm/`` for every Slurm test
    (they share the session's clusters, which another worker would start again)."""
    path = nodeid.split("::")[0]
    return "tests/slurm/" if path.startswith("tests/slurm/") else path


def pytest_configure(config: pytest.Config) -> None:
    """Under ``--dist loadgroup`` hand the units out in collection order (``LONGEST_FIRST``), not by test count."""
    if getattr(config.option, "dist", None) == "loadgroup":
        config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``-n N --dist loadgroup`` (pytest-xdist; the README's test command): every test file is one unit (its
    module fixtures, such as the one-process reference runs, are built once), the Slurm tests are one unit, and the
    longest units go first."""
    if not getattr(config.option, "loadgroup", False):  # set on pytest-xdist's workers, which collect
        return
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_unit(item.nodeid)))
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item.nodeid), len(rank)))  # stable: the rest keep their order
