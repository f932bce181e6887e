"""Truncated importance sampling for the rollout/trainer mismatch, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.config.schema import GRPOLossConfig
from r1mega.rl.objective import compute_policy_objective
from r1mega.rl.rollout_correction import get_rollout_correction

LN = math.log


def _lp(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([[LN(p) for p in row] for row in rows], dtype=torch.float64)


def test_token_tis_truncates_each_ratio() -> None:
    # pi_old / pi_rollout = 0.5/0.5, 0.5/0.25, 0.9/0.3 = 1, 2, 3; cap 2.5 -> 1, 2, 2.5 (one truncated)
    old, rollout = _lp([[0.5, 0.5, 0.9]]), _lp([[0.5, 0.25, 0.3]])
    out = get_rollout_correction("tis")(old, rollout, torch.ones(1, 3, dtype=torch.bool), 2.5)
    torch.testing.assert_close(out.weights, torch.tensor([[1.0, 2.0, 2.5]], dtype=torch.float64))
    assert out.metrics["rollout_is_mean"].item() == pytest.approx(5.5 / 3)
    assert out.metrics["rollout_is_clipfrac"].item() == pytest.approx(1 / 3)
    assert out.metrics["rollout_logp_gap"].item() == pytest.approx((LN(2) + LN(3)) / 3)
    assert out.metrics["rollout_logp_gap_max"].item() == pytest.approx(LN(3))


def test_padding_gets_weight_zero_even_when_nan() -> None:
    old = torch.tensor([[LN(0.5), float("nan")]], dtype=torch.float64)
    rollout = torch.tensor([[LN(0.25), float("nan")]], dtype=torch.float64)
    for name in ("tis", "tis_seq"):
        out = get_rollout_correction(name)(old, rollout, torch.tensor([[True, False]]), 2.0)
        torch.testing.assert_close(out.weights, torch.tensor([[2.0, 0.0]], dtype=torch.float64))
        assert all(math.isfinite(v.item()) for v in out.metrics.values())


def test_sequence_tis_uses_the_product_of_ratios() -> None:
    # row 0: ratios 2 and 0.5 -> product 1 for both tokens; row 1: 2 * 1.5 = 3 -> truncated at 2.5
    old, rollout = _lp([[0.5, 0.25], [0.6, 0.6]]), _lp([[0.25, 0.5], [0.3, 0.4]])
    out = get_rollout_correction("tis_seq")(old, rollout, torch.ones(2, 2, dtype=torch.bool), 2.5)
    torch.testing.assert_close(out.weights, torch.tensor([[1.0, 1.0], [2.5, 2.5]], dtype=torch.float64))
    assert out.metrics["rollout_is_clipfrac"].item() == pytest.approx(0.5)


def test_objective_weights_the_policy_loss_and_its_gradient() -> None:
    """On-policy tokens (ratio 1), advantage 1: the PPO token loss is -1, so with weights 1, 2, 2.5 the
    token-mean loss is -5.5/3 and each token's gradient is scaled by its weight."""
    cfg = GRPOLossConfig(kl_coef=0.0, rollout_correction="tis", rollout_is_cap=2.5)
    old, rollout = _lp([[0.5, 0.5, 0.9]]), _lp([[0.5, 0.25, 0.3]])
    logp = old.clone().requires_grad_(True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, metrics = compute_policy_objective(logp, old, torch.ones(1, dtype=torch.float64), mask, cfg,
                                             rollout_logp=rollout)  # fmt: skip
    assert loss.item() == pytest.approx(-5.5 / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, -torch.tensor([[1.0, 2.0, 2.5]], dtype=torch.float64) / 3)
    assert metrics["rollout_is_clipfrac"].item() == pytest.approx(1 / 3)
    plain, _ = compute_policy_objective(
        logp, old, torch.ones(1, dtype=torch.float64), mask, GRPOLossConfig(kl_coef=0.0)
    )
    assert plain.item() == pytest.approx(-1.0)  # off by default: the rollout log-probs are not even needed
    with pytest.raises(ValueError, match="rollout_logp"):
        compute_policy_objective(logp, old, torch.ones(1, dtype=torch.float64), mask, cfg)
