"""Per-token estimators of ``KL(pi || pi_ref)`` from log-probabilities of sampled tokens (Schulman's k1/k2/k3).

With ``d_t = log pi(y_t) - log pi_ref(y_t)`` for a token ``y_t`` sampled from ``pi``:

- ``k1 = d`` — unbiased, high variance, can be negative;
- ``k2 = d^2 / 2`` — biased, low variance, non-negative;
- ``k3 = exp(-d) - (-d) - 1 = rho - log(rho) - 1`` with ``rho = pi_ref / pi`` — unbiased, low
  variance, non-negative (GRPO's KL term in DeepSeekMath);
- ``low_var_kl`` — k3 with verl's clamps: ``log rho`` clamped to [-20, 20], the result to [-10, 10].

Each estimator is registered by name as ``(logp (b,t), ref_logp (b,t)) -> kl (b,t)``. The KL is used
either in the loss (``kl_coef * aggregate(kl)``, see :mod:`r1mega.rl.objective`) or subtracted from the
reward before the advantages (:func:`apply_kl_to_rewards`), as ``GRPOLossConfig.kl_in_reward`` selects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from r1mega.rl.registry import Registry

KLFn = Callable[[Tensor, Tensor], Tensor]
"""``(logp (b,t), ref_logp (b,t)) -> per-token KL estimate (b,t)``."""

KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")
register_kl_estimator = KL_ESTIMATORS.register
get_kl_estimator = KL_ESTIMATORS.get

_LOG_RATIO_CLAMP = 20.0
"""``exp(20) ~ 5e8``: beyond this the log-ratio is clamped before ``exp`` (verl's value)."""


@register_kl_estimator("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``k1 = log pi - log pi_ref``."""
    return logp - ref_logp  # (b, t)


@register_kl_estimator("k2")
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``k2 = (log pi - log pi_ref)^2 / 2``."""
    return 0.5 * (logp - ref_logp).square()  # (b, t)


def kl_k3(logp: Tensor, ref_logp: Tensor, clamp: float | None = None) -> Tensor:
    """``k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 >= 0``.

    With ``clamp`` set, ``log pi_ref - log pi`` is first clamped to [-20, 20] and the result to
    ``[-clamp, clamp]`` (a clamped token then passes no gradient).
    """
    log_rho = ref_logp - logp  # (b, t)
    if clamp is not None:
        log_rho = log_rho.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    kl = log_rho.exp() - log_rho - 1  # (b, t)
    return kl if clamp is None else kl.clamp(-clamp, clamp)


register_kl_estimator("k3")(kl_k3)


@register_kl_estimator("low_var_kl")
def kl_low_var(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """verl's ``low_var_kl``: :func:`kl_k3` with ``clamp=10``."""
    return kl_k3(logp, ref_logp, clamp=10.0)


def kl_penalty(logp: Tensor, ref_logp: Tensor, mask: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate ``(b, t)`` with the named estimator; exactly 0 at padding.

    Padding is replaced before the estimator runs, so garbage there (even NaN) affects neither the
    values nor the gradients.
    """
    m = mask.bool()  # (b, t)
    logp = torch.where(m, logp, 0)  # (b, t)
    ref_logp = torch.where(m, ref_logp.detach(), 0)  # (b, t)
    return torch.where(m, get_kl_estimator(estimator)(logp, ref_logp), 0)  # (b, t)


@torch.no_grad()
def kl_reward_penalty(
    old_logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float, estimator: str = "k1"
) -> Tensor:
    """Per-token reward shaping term ``-kl_coef * KL_t(pi_old || pi_ref)`` ``(b, t)``, 0 at padding, no grad.

    ``old_logp`` are the log-probabilities of the policy that generated the rollout (verl uses k1 here).
    """
    return -kl_coef * kl_penalty(old_logp, ref_logp, mask, estimator)  # (b, t)


@torch.no_grad()
def apply_kl_to_rewards(
    rewards: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float, estimator: str = "k1"
) -> Tensor:
    """Outcome rewards with the summed KL penalty: ``r_i - kl_coef * sum_t m_{i,t} KL_{i,t}`` ``(b,)``.

    Feed the result to :func:`r1mega.rl.advantages.compute_advantages`, which wants one scalar per sequence.
    """
    return rewards + kl_reward_penalty(old_logp, ref_logp, mask, kl_coef, estimator).sum(-1)  # (b,)
