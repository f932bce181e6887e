"""Fixtures every test shares."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


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
