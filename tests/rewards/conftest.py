"""One verifier pool for the reward tests (starting the fork server and warming math-verify takes seconds)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from r1mega.rewards import VerifierPool

TIME_LIMIT_S = 1.0
NUM_WORKERS = 4


@pytest.fixture(scope="session")
def pool() -> Iterator[VerifierPool]:
    with VerifierPool(num_workers=NUM_WORKERS, time_limit_s=TIME_LIMIT_S) as p:
        yield p
