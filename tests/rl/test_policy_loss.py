"""Policy losses against hand-computed values: PPO clipping, clip-higher, dual-clip, GSPO, padding and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.config.schema import GRPOLossConfig
from r1mega.rl.aggregation import aggregate_loss
from r1mega.rl.policy_loss import clipped_surrogate, get_policy_loss

LN = math.log
NAN = math.nan


def _cfg(**kw: object) -> GRPOLossConfig:
    return GRPOLossConfig(**kw)  # type: ignore[arg-type]


def _run(name: str, ratios: list[list[float]], adv: list[float], mask: list[list[int]] | None = None, **cfg: object):
    """Per-token loss, metrics and d(sum loss)/d logp for old_logp = 0, logp = log(ratio)."""
    logp = torch.tensor([[LN(r) for r in row] for row in ratios], dtype=torch.float64, requires_grad=True)
    m = torch.ones_like(logp, dtype=torch.bool) if mask is None else torch.tensor(mask, dtype=torch.bool)
    out = get_policy_loss(name)(logp, torch.zeros_like(logp), torch.tensor(adv, dtype=torch.float64), m, _cfg(**cfg))
    out.loss.sum().backward()
    assert logp.grad is not None
    return out.loss.detach(), out.metrics, logp.grad


def test_ppo_symmetric_clip_positive_advantage() -> None:
    # A = +1, eps 0.2: r=0.5 -> max(-0.5, -0.8) = -0.5; r=1 -> -1; r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped)
    loss, metrics, grad = _run("ppo", [[0.5, 1.0, 1.5]], [1.0])
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.0, -1.2]], dtype=torch.float64))
    # d(-A r)/d log r = -A r where unclipped; 0 where clipped
    torch.testing.assert_close(grad, torch.tensor([[-0.5, -1.0, 0.0]], dtype=torch.float64))
    assert metrics["pg_clipfrac_high"].item() == pytest.approx(1 / 3)
    assert metrics["pg_clipfrac_low"].item() == 0.0


def test_ppo_symmetric_clip_negative_advantage() -> None:
    # A = -1: r=0.5 -> max(0.5, 0.8) = 0.8 (clipped low); r=1 -> 1; r=1.5 -> max(1.5, 1.2) = 1.5 (not clipped)
    loss, metrics, grad = _run("ppo", [[0.5, 1.0, 1.5]], [-1.0])
    torch.testing.assert_close(loss, torch.tensor([[0.8, 1.0, 1.5]], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.0, 1.5]], dtype=torch.float64))
    assert metrics["pg_clipfrac_low"].item() == pytest.approx(1 / 3)
    assert metrics["pg_clipfrac_high"].item() == 0.0
    assert metrics["pg_clipfrac_dual"].item() == 0.0


def test_ppo_metrics_hand_values() -> None:
    _, metrics, _ = _run("ppo", [[0.5, 1.0, 2.0]], [1.0])
    assert metrics["ratio_mean"].item() == pytest.approx(3.5 / 3)
    assert metrics["ratio_min"].item() == pytest.approx(0.5)
    assert metrics["ratio_max"].item() == pytest.approx(2.0)
    assert metrics["ppo_kl"].item() == pytest.approx(-(LN(0.5) + LN(2.0)) / 3, abs=1e-12)  # mean(old - new) = 0
    # k3 = r - 1 - log r: (0.5 - 1 + ln 2) + 0 + (2 - 1 - ln 2) = 0.5
    assert metrics["ppo_kl_k3"].item() == pytest.approx(0.5 / 3)
    assert not any(v.requires_grad for v in metrics.values())


def test_clip_higher_asymmetry() -> None:
    # eps_low 0.2, eps_high 0.28 (DAPO). Row 0, A=+1: r=1.25 stays (-1.25; symmetric 0.2 would give -1.2),
    # r=1.3 -> -1.28. Row 1, A=-1: r=0.75 -> 0.8 (clipped at 1 - 0.2), r=0.85 stays.
    loss, metrics, grad = _run("ppo", [[1.25, 1.3], [0.75, 0.85]], [1.0, -1.0], clip_eps_low=0.2, clip_eps_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.25, -1.28], [0.8, 0.85]], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([[-1.25, 0.0], [0.0, 0.85]], dtype=torch.float64))
    assert metrics["pg_clipfrac_high"].item() == 0.25 and metrics["pg_clipfrac_low"].item() == 0.25
    symmetric, _, _ = _run("ppo", [[1.25, 1.3]], [1.0], clip_eps_low=0.2, clip_eps_high=0.2)
    torch.testing.assert_close(symmetric, torch.tensor([[-1.2, -1.2]], dtype=torch.float64))


def test_dual_clip_caps_negative_advantages() -> None:
    # A = -1, c = 3: r=2 -> 2 (below the cap); r=4 -> min(4, 3) = 3, no gradient
    loss, metrics, grad = _run("ppo", [[2.0, 4.0]], [-1.0], clip_ratio_c=3.0)
    torch.testing.assert_close(loss, torch.tensor([[2.0, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([[2.0, 0.0]], dtype=torch.float64))
    assert metrics["pg_clipfrac_dual"].item() == 0.5
    off, _, _ = _run("ppo", [[2.0, 4.0]], [-1.0])
    torch.testing.assert_close(off, torch.tensor([[2.0, 4.0]], dtype=torch.float64))
    # positive advantages are untouched by dual-clip: r=4, A=+1 -> -1.2
    pos, metrics, _ = _run("ppo", [[4.0]], [1.0], clip_ratio_c=3.0)
    assert pos.item() == pytest.approx(-1.2) and metrics["pg_clipfrac_dual"].item() == 0.0


def test_dual_clip_bound_holds_everywhere() -> None:
    g = torch.Generator().manual_seed(0)
    ratio = torch.exp(torch.randn(64, 32, generator=g) * 3)  # ratios from ~1e-4 to ~1e4
    adv = torch.randn(64, 32, generator=g)
    loss, _, _, dual = clipped_surrogate(ratio, adv, 0.2, 0.28, 3.0)
    neg = adv < 0
    assert torch.all(loss[neg] <= -adv[neg] * 3.0 + 1e-6)
    assert dual.any() and not dual[~neg].any()


def test_gspo_hand_values() -> None:
    # row 0: token ratios [1.1, 0.9] -> s = exp(mean(ln 1.1, ln 0.9)) = sqrt(0.99); A=+1 -> -sqrt(.99) per token
    # row 1: ratios [2, 2, 2] -> s = 2, A=+1 -> clipped at 1.2 for the whole sequence, no gradient
    # row 2: ratios [2, 2, pad] -> s = 2, A=-1 -> max(2, 1.2) = 2, not clipped
    s0 = math.sqrt(0.99)
    loss, metrics, grad = _run(
        "gspo",
        [[1.1, 0.9, 1.0], [2.0, 2.0, 2.0], [2.0, 2.0, 1.0]],
        [1.0, 1.0, -1.0],
        mask=[[1, 1, 0], [1, 1, 1], [1, 1, 0]],
    )
    expected = torch.tensor([[-s0, -s0, 0.0], [-1.2, -1.2, -1.2], [2.0, 2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(loss, expected)
    # d/d logp_t of -A * sg[s] * exp(logp_t - sg[logp_t]) = -A * s
    torch.testing.assert_close(grad, torch.tensor([[-s0, -s0, 0], [0, 0, 0], [2, 2, 0]], dtype=torch.float64))
    assert metrics["pg_clipfrac_high"].item() == pytest.approx(3 / 7)
    assert metrics["ratio_max"].item() == pytest.approx(2.0) and metrics["ratio_min"].item() == pytest.approx(s0)


def test_gspo_gradient_equals_sequence_level_formula() -> None:
    g = torch.Generator().manual_seed(1)
    b, t = 6, 5
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [0] * 5, [1] * 5]).bool()
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0, 0.7, 0.3], dtype=torch.float64)
    cfg = _cfg(policy_loss="gspo", clip_eps_low=0.05, clip_eps_high=0.08, loss_agg_mode="seq-mean-token-mean")

    out = get_policy_loss("gspo")(logp, old, adv, mask, cfg)
    loss = aggregate_loss(out.loss, mask, "seq-mean-token-mean")
    (grad,) = torch.autograd.grad(loss, logp)

    # the GSPO objective written at sequence level: (1/S) sum_i max(-A_i s_i, -A_i clip(s_i)) over non-empty i
    n = mask.sum(-1)
    s = torch.exp(torch.where(mask, logp - old, 0).sum(-1) / n.clamp(min=1))
    per_seq = torch.maximum(-adv * s, -adv * s.clamp(1 - 0.05, 1 + 0.08))
    reference = per_seq[n > 0].mean()
    (grad_ref,) = torch.autograd.grad(reference, logp)

    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad, grad_ref)
    clipped = torch.maximum(-adv * s, -adv * s.clamp(0.95, 1.08)) != -adv * s
    assert clipped.any() and (~clipped & (n > 0)).any()  # the data exercises both cases
    assert torch.all(grad[clipped] == 0)


@pytest.mark.parametrize("name", ["ppo", "gspo"])
def test_padding_garbage_changes_nothing(name: str) -> None:
    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]).bool()
    clean_logp = -torch.rand(3, 4, generator=g)
    clean_old = clean_logp + 0.3 * torch.randn(3, 4, generator=g)
    clean_adv = torch.randn(3, 4, generator=g)
    cfg = _cfg(clip_ratio_c=3.0)

    def run(fill: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        logp = torch.where(mask, clean_logp, fill).requires_grad_()
        old, adv = torch.where(mask, clean_old, fill), torch.where(mask, clean_adv, fill)
        out = get_policy_loss(name)(logp, old, adv, mask, cfg)
        aggregate_loss(out.loss, mask, "token-mean").backward()
        assert logp.grad is not None
        return out.loss.detach(), out.metrics, logp.grad

    zero_loss, zero_metrics, zero_grad = run(0.0)
    for fill in (NAN, 1e9, -math.inf):
        loss, metrics, grad = run(fill)
        assert torch.equal(loss, zero_loss) and torch.equal(grad, zero_grad)
        assert {k: v.item() for k, v in metrics.items()} == {k: v.item() for k, v in zero_metrics.items()}
    assert torch.all(zero_loss[~mask] == 0) and torch.all(zero_grad[~mask] == 0)


def test_single_token_gspo_equals_ppo() -> None:
    # with one token the sequence ratio is the token ratio, so GSPO and PPO agree (values and gradients)
    ratios, adv, mask = [[1.5, 1.0], [0.5, 1.0], [1.05, 1.0]], [1.0, -1.0, 2.0], [[1, 0], [1, 0], [1, 0]]
    ppo = _run("ppo", ratios, adv, mask)
    gspo = _run("gspo", ratios, adv, mask)
    torch.testing.assert_close(ppo[0], gspo[0])
    torch.testing.assert_close(ppo[2], gspo[2])
    torch.testing.assert_close(ppo[0], torch.tensor([[-1.2, 0.0], [0.8, 0.0], [-2.1, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("name", ["ppo", "gspo"])
def test_zero_length_response(name: str) -> None:
    loss, metrics, grad = _run(name, [[1.5, 1.0], [1.0, 1.0]], [1.0, 1.0], mask=[[0, 0], [0, 0]])
    assert torch.all(loss == 0) and torch.all(grad == 0)
    assert all(v.item() == 0.0 for v in metrics.values())


def test_token_level_advantages_and_shape_errors() -> None:
    loss, _, _ = _run("ppo", [[1.0, 1.0]], [[1.0, -2.0]])  # (b, t) advantages are used as given
    torch.testing.assert_close(loss, torch.tensor([[-1.0, 2.0]], dtype=torch.float64))
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"advantages must have shape \(b,\) or \(b, t\)"):
        get_policy_loss("ppo")(x, x, torch.zeros(3), x.bool(), _cfg())
    with pytest.raises(ValueError, match="same"):
        get_policy_loss("ppo")(x, torch.zeros(2, 4), torch.zeros(2), x.bool(), _cfg())


def test_ppo_log_ratio_is_clamped() -> None:
    loss, metrics, _ = _run("ppo", [[math.exp(50.0)]], [-1.0])  # log-ratio 50 -> clamped to 20
    assert loss.item() == pytest.approx(math.exp(20.0)) and math.isfinite(metrics["ratio_max"].item())
