"""Fixtures of the converter tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))
