"""KL estimators k1/k2/k3/low_var_kl against hand-computed values; masking; the in-reward helpers."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.rl.kl import apply_kl_to_rewards, get_kl_estimator, kl_k3, kl_penalty, kl_reward_penalty

LN2 = math.log(2.0)


def _kl(name: str, p: float, p_ref: float) -> float:
    return get_kl_estimator(name)(torch.tensor([math.log(p)]), torch.tensor([math.log(p_ref)])).item()


def test_hand_values() -> None:
    # pi = 0.5, pi_ref = 0.25: d = ln 2
    assert _kl("k1", 0.5, 0.25) == pytest.approx(LN2)
    assert _kl("k2", 0.5, 0.25) == pytest.approx(0.5 * LN2**2)  # 0.2402265
    assert _kl("k3", 0.5, 0.25) == pytest.approx(0.5 + LN2 - 1)  # rho = 0.5: 0.1931472
    assert _kl("low_var_kl", 0.5, 0.25) == pytest.approx(0.5 + LN2 - 1)
    # pi = 0.25, pi_ref = 0.5: d = -ln 2
    assert _kl("k1", 0.25, 0.5) == pytest.approx(-LN2)
    assert _kl("k2", 0.25, 0.5) == pytest.approx(0.5 * LN2**2)
    assert _kl("k3", 0.25, 0.5) == pytest.approx(2 - LN2 - 1)  # rho = 2: 0.3068528
    for name in ("k1", "k2", "k3", "low_var_kl"):
        assert _kl(name, 0.3, 0.3) == 0.0


def test_k3_is_non_negative() -> None:
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert torch.all(get_kl_estimator("k3")(logp, ref) >= 0)


def test_low_var_kl_clamps() -> None:
    logp, ref = torch.tensor([0.0, 30.0, 0.0]), torch.tensor([30.0, 0.0, -0.5])
    # log rho = 30 -> clamped to 20 -> e^20 - 21 -> clamped to 10;  log rho = -30 -> -20 -> e^-20 + 19 -> 10
    assert get_kl_estimator("low_var_kl")(logp, ref).tolist() == pytest.approx([10.0, 10.0, math.exp(-0.5) - 0.5])
    assert kl_k3(logp, ref)[0].item() == pytest.approx(math.exp(30) - 31, rel=1e-6)  # unclamped
    assert kl_k3(logp, ref, clamp=5.0)[:2].tolist() == [5.0, 5.0]


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_penalty_masks_padding(name: str) -> None:
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]]).bool()
    logp = torch.tensor([[math.log(0.5), -1.0, math.nan], [math.inf, math.nan, 1e9]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), -1.0, 3.0], [math.nan, -math.inf, 0.0]])
    kl = kl_penalty(logp, ref, mask, name)
    assert kl[0, 0].item() == pytest.approx(_kl(name, 0.5, 0.25)) and kl[0, 1].item() == 0.0
    assert torch.all(kl[~mask] == 0)
    kl.sum().backward()
    assert logp.grad is not None and torch.isfinite(logp.grad).all() and torch.all(logp.grad[~mask] == 0)


def test_kl_in_reward() -> None:
    # per-token k1 = [[ln 2, 0], [ln 2, pad]]; coef 0.1 -> penalties -0.1 ln 2 per sequence
    old = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.9]]))
    ref = torch.tensor([[math.log(0.25), math.log(0.5)], [math.log(0.25), math.nan]])
    mask = torch.tensor([[1, 1], [1, 0]])
    per_token = kl_reward_penalty(old, ref, mask, 0.1)
    torch.testing.assert_close(per_token, torch.tensor([[-0.1 * LN2, 0.0], [-0.1 * LN2, 0.0]]))
    shaped = apply_kl_to_rewards(torch.tensor([1.0, 0.0]), old, ref, mask, 0.1)
    torch.testing.assert_close(shaped, torch.tensor([1 - 0.1 * LN2, -0.1 * LN2]))
    assert not shaped.requires_grad
    # k3 in the reward: 0.1 * (0.5 + ln 2 - 1)
    k3 = apply_kl_to_rewards(torch.tensor([0.0]), old[:1, :1], ref[:1, :1], mask[:1, :1], 0.1, "k3")
    assert k3.item() == pytest.approx(-0.1 * (LN2 - 0.5))
