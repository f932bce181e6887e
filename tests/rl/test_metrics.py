"""Masked mean / min / max: padding (even NaN or inf) never counts, and an empty mask gives 0."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.rl.metrics import masked_max, masked_mean, masked_min, masked_stats, masked_sum

NAN = math.nan


def test_masked_reductions_ignore_garbage() -> None:
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, 1e9, -math.inf]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_sum(x, m).item() == 7.0
    assert masked_mean(x, m).item() == pytest.approx(7.0 / 3)
    assert masked_min(x, m).item() == 1.0
    assert masked_max(x, m).item() == 4.0
    assert torch.equal(masked_mean(x, m, dim=-1), torch.tensor([1.5, 4.0]))
    assert torch.equal(masked_sum(x, m, dim=-1), torch.tensor([3.0, 4.0]))


def test_empty_mask_gives_zero() -> None:
    x = torch.tensor([[NAN, 5.0]])
    m = torch.zeros(1, 2, dtype=torch.bool)
    for fn in (masked_sum, masked_mean, masked_min, masked_max):
        assert fn(x, m).item() == 0.0
    assert masked_mean(x, m, dim=-1).tolist() == [0.0]


def test_masked_stats_names_and_no_grad() -> None:
    x = torch.tensor([0.5, 1.5, 9.0], requires_grad=True)
    stats = masked_stats(x, torch.tensor([True, True, False]), "ratio")
    assert {k: v.item() for k, v in stats.items()} == {"ratio_mean": 1.0, "ratio_min": 0.5, "ratio_max": 1.5}
    assert not any(v.requires_grad for v in stats.values())
