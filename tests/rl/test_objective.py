"""compute_policy_objective: the pieces combined (hand values), its switches, and micro-batch additivity."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.config.schema import GRPOLossConfig
from r1mega.rl.aggregation import aggregate_loss, local_normalizers
from r1mega.rl.kl import kl_penalty
from r1mega.rl.objective import compute_policy_objective
from r1mega.rl.policy_loss import get_policy_loss

LN2 = math.log(2.0)


def _inputs() -> dict[str, torch.Tensor]:
    # one sequence of 2 valid tokens + padding; ratio 1 everywhere; k1 to the reference = [ln 2, 0]
    logp = torch.tensor([[math.log(0.5), math.log(0.25), math.nan]], requires_grad=True)
    return {
        "logp": logp,
        "old_logp": torch.tensor([[math.log(0.5), math.log(0.25), 0.0]]),
        "advantages": torch.tensor([1.0]),
        "mask": torch.tensor([[1, 1, 0]]),
        "ref_logp": torch.tensor([[math.log(0.25), math.log(0.25), math.nan]]),
        "entropy": torch.tensor([[1.0, 2.0, math.nan]]),
    }


def test_hand_value() -> None:
    cfg = GRPOLossConfig(kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01)
    loss, metrics = compute_policy_objective(**_inputs(), config=cfg)  # type: ignore[arg-type]
    # pg: -A * r = -1 per token -> -1; kl: (ln 2 + 0) / 2; entropy: (1 + 2) / 2
    assert metrics["pg_loss"].item() == pytest.approx(-1.0)
    assert metrics["kl_loss"].item() == pytest.approx(LN2 / 2)
    assert metrics["entropy"].item() == pytest.approx(1.5)
    assert loss.item() == pytest.approx(-1.0 + 0.1 * LN2 / 2 - 0.01 * 1.5)
    assert metrics["loss"].item() == pytest.approx(loss.item())


def test_gradient_is_finite_and_zero_at_padding() -> None:
    inputs = _inputs()
    cfg = GRPOLossConfig(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    loss, _ = compute_policy_objective(**inputs, config=cfg)  # type: ignore[arg-type]
    loss.backward()
    grad = inputs["logp"].grad
    assert grad is not None and torch.isfinite(grad).all() and grad[0, 2].item() == 0.0


def test_switches() -> None:
    inputs = _inputs()
    ref, entropy = inputs.pop("ref_logp"), inputs.pop("entropy")
    # KL in the reward: no KL term and no reference needed
    loss, metrics = compute_policy_objective(**inputs, config=GRPOLossConfig(kl_in_reward=True))  # type: ignore[arg-type]
    assert loss.item() == pytest.approx(-1.0) and "kl_loss" not in metrics and "entropy" not in metrics
    loss, metrics = compute_policy_objective(**inputs, config=GRPOLossConfig(kl_coef=0.0), entropy=entropy)  # type: ignore[arg-type]
    assert loss.item() == pytest.approx(-1.0) and metrics["entropy"].item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="ref_logp"):
        compute_policy_objective(**inputs, config=GRPOLossConfig(kl_coef=0.1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="entropy"):
        compute_policy_objective(**inputs, config=GRPOLossConfig(entropy_coef=0.1), ref_logp=ref)  # type: ignore[arg-type]


def _random(seed: int, b: int = 6, t: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    lengths = torch.tensor([5, 1, 0, 3, 4, 2])
    return {
        "logp": (old + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)).requires_grad_(),
        "old_logp": old,
        "advantages": torch.randn(b, generator=g, dtype=torch.float64),
        "mask": torch.arange(t)[None, :] < lengths[:, None],
        "ref_logp": old + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64),
        "entropy": torch.rand(b, t, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("policy_loss", ["ppo", "gspo"])
def test_equals_the_pieces(policy_loss: str) -> None:
    x = _random(0)
    cfg = GRPOLossConfig(
        policy_loss=policy_loss, loss_agg_mode="seq-mean-token-mean", clip_ratio_c=3.0, kl_coef=0.05, entropy_coef=0.01
    )
    loss, metrics = compute_policy_objective(**x, config=cfg)  # type: ignore[arg-type]
    m = x["mask"]
    pg = get_policy_loss(policy_loss)(x["logp"], x["old_logp"], x["advantages"], m, cfg)
    expected = (
        aggregate_loss(pg.loss, m, "seq-mean-token-mean")
        + 0.05 * aggregate_loss(kl_penalty(x["logp"], x["ref_logp"], m, "low_var_kl"), m, "seq-mean-token-mean")
        - 0.01 * aggregate_loss(x["entropy"], m, "seq-mean-token-mean")
    )
    torch.testing.assert_close(loss, expected)
    for key in ("pg_clipfrac_low", "pg_clipfrac_high", "ppo_kl", "ratio_mean", "pg_loss", "kl_loss", "entropy"):
        assert key in metrics and not metrics[key].requires_grad


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_add_up(mode: str) -> None:
    x = _random(1)
    cfg = GRPOLossConfig(loss_agg_mode=mode, max_response_length=16, kl_coef=0.05, entropy_coef=0.01)
    full, _ = compute_policy_objective(**x, config=cfg)  # type: ignore[arg-type]
    (grad_full,) = torch.autograd.grad(full, x["logp"])
    halves = [slice(0, 2), slice(2, 6)]
    counts = [local_normalizers(x["mask"][h]) for h in halves]
    tokens, seqs = sum(c[0] for c in counts), sum(c[1] for c in counts)
    parts = [
        compute_policy_objective(
            **{k: v[h] for k, v in x.items()},  # type: ignore[arg-type]
            config=cfg,
            global_tokens=tokens,
            global_seqs=seqs,
        )[0]
        for h in halves
    ]
    (grad_parts,) = torch.autograd.grad(sum(parts), x["logp"])
    torch.testing.assert_close(sum(parts), full)
    torch.testing.assert_close(grad_parts, grad_full)
