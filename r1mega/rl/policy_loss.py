"""Per-token policy losses: PPO clipped surrogate (with DAPO clip-higher and dual-clip) and GSPO.

Every loss is registered by name with the signature
``(logp (b,t), old_logp (b,t), advantages (b,) or (b,t), mask (b,t), config) -> PolicyLossOutput``
and returns the per-token loss ``(b, t)`` (exactly 0 at padding) plus detached scalar metrics; the
scalar objective comes from :func:`r1mega.rl.aggregation.aggregate_loss`.

Clipped surrogate, with ratio ``r``, advantage ``A``, ``eps_low``/``eps_high`` and dual-clip ``c``::

    L = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))        # PPO; DAPO when eps_high > eps_low
    L = min(L, -A * c)   where A < 0                                # dual-clip (Ye et al. 2020), if c set

A clipped token's loss is a constant, so it passes no gradient. Metrics (all over valid tokens):
``pg_clipfrac_low`` (A < 0 and r < 1 - eps_low), ``pg_clipfrac_high`` (A > 0 and r > 1 + eps_high),
``pg_clipfrac_dual`` (capped by dual-clip), ``ppo_kl`` (k1 estimate ``mean(log pi_old - log pi)``),
``ppo_kl_k3`` (``mean(r - 1 - log r)``), ``ratio_mean`` / ``ratio_min`` / ``ratio_max``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from r1mega.rl.metrics import masked_mean, masked_stats
from r1mega.rl.registry import Registry

if TYPE_CHECKING:
    from r1mega.config.schema import GRPOLossConfig


class PolicyLossOutput(NamedTuple):
    """What a policy loss returns."""

    loss: Tensor
    """Per-token loss ``(b, t)``, exactly 0 at padding."""
    metrics: dict[str, Tensor]
    """Detached scalar metrics over the valid tokens."""


PolicyLossFn = Callable[[Tensor, Tensor, Tensor, Tensor, "GRPOLossConfig"], PolicyLossOutput]
"""``(logp, old_logp, advantages, mask, config) -> PolicyLossOutput``."""

POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")
register_policy_loss = POLICY_LOSSES.register
get_policy_loss = POLICY_LOSSES.get

PPO_LOG_RATIO_CLAMP = 20.0
"""PPO's token log-ratio is clamped to [-20, 20] before ``exp`` (verl's value)."""
GSPO_LOG_RATIO_MAX = 10.0
"""GSPO's sequence log-ratio is clamped above at 10 before ``exp`` (verl's value)."""


def _prepare(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Check shapes, broadcast ``(b,)`` advantages to ``(b, t)`` and replace padding by 0 in every input.

    Replacing (``torch.where``) rather than multiplying by the mask keeps NaN/inf padding out of both the
    values and the gradients. ``old_logp`` and the advantages are detached: they are constants of the loss.
    """
    m = mask.bool()  # (b, t)
    if logp.dim() != 2 or logp.shape != old_logp.shape or logp.shape != m.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask {tuple(mask.shape)} "
            "must all have the same (batch, response_tokens) shape"
        )
    if advantages.shape == logp.shape[:1]:
        advantages = advantages[:, None].expand(logp.shape)  # (b, t)
    elif advantages.shape != logp.shape:
        raise ValueError(
            f"advantages must have shape (b,) or (b, t) = {tuple(logp.shape)}; got {tuple(advantages.shape)}"
        )
    zero = logp.new_zeros(())
    logp = torch.where(m, logp, zero)  # (b, t)
    old_logp = torch.where(m, old_logp.detach(), zero)  # (b, t)
    advantages = torch.where(m, advantages.detach(), zero)  # (b, t)
    return logp, old_logp, advantages, m


def clipped_surrogate(
    ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float, clip_ratio_c: float | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Clipped surrogate loss ``(b, t)`` and boolean masks ``(b, t)`` of the low-, high- and dual-clipped tokens.

    ``L = max(-A r, -A clip(r, 1-eps_low, 1+eps_high))``, then ``L = min(L, -A c)`` where ``A < 0`` if
    ``clip_ratio_c`` (``c > 1``) is set. See the module docstring.
    """
    loss_unclipped = -advantages * ratio  # (b, t)
    loss_clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # (b, t)
    loss = torch.maximum(loss_unclipped, loss_clipped)  # (b, t)
    clipped = loss_clipped > loss_unclipped  # (b, t)
    low, high = clipped & (advantages < 0), clipped & (advantages > 0)  # (b, t)
    dual = torch.zeros_like(clipped)  # (b, t)
    if clip_ratio_c is not None:
        bound = -advantages * clip_ratio_c  # (b, t)
        dual = (advantages < 0) & (loss > bound)  # (b, t)
        loss = torch.where(dual, bound, loss)  # (b, t)
    return loss, low, high, dual


@torch.no_grad()
def _metrics(log_ratio: Tensor, ratio: Tensor, low: Tensor, high: Tensor, dual: Tensor, m: Tensor) -> dict[str, Tensor]:
    """Clip fractions, approximate KL(old || new) and ratio statistics over the valid tokens."""
    return {
        "pg_clipfrac_low": masked_mean(low.float(), m),
        "pg_clipfrac_high": masked_mean(high.float(), m),
        "pg_clipfrac_dual": masked_mean(dual.float(), m),
        "ppo_kl": masked_mean(-log_ratio, m),
        "ppo_kl_k3": masked_mean(log_ratio.exp() - 1 - log_ratio, m),
        **masked_stats(ratio, m, "ratio"),
    }


@register_policy_loss("ppo")
def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, config: GRPOLossConfig
) -> PolicyLossOutput:
    """Token-level PPO/GRPO clipped surrogate with ``r_t = exp(log pi(y_t) - log pi_old(y_t))``.

    The log-ratio is clamped to [-20, 20] before ``exp``. Clipping is asymmetric when
    ``clip_eps_high != clip_eps_low`` (DAPO clip-higher) and dual-clipped when ``clip_ratio_c`` is set.
    """
    logp, old_logp, adv, m = _prepare(logp, old_logp, advantages, mask)
    log_ratio = (logp - old_logp).clamp(-PPO_LOG_RATIO_CLAMP, PPO_LOG_RATIO_CLAMP)  # (b, t)
    ratio = log_ratio.exp()  # (b, t)
    loss, low, high, dual = clipped_surrogate(
        ratio, adv, config.clip_eps_low, config.clip_eps_high, config.clip_ratio_c
    )
    loss = torch.where(m, loss, 0)  # (b, t)
    return PolicyLossOutput(loss, _metrics(log_ratio, ratio, low, high, dual, m))


@register_policy_loss("gspo")
def gspo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, config: GRPOLossConfig
) -> PolicyLossOutput:
    """GSPO (Zheng et al. 2025): the clipped surrogate on a sequence-level importance ratio.

    ``s_i = exp((1/n_i) sum_t m_{i,t} (log pi(y_{i,t}) - log pi_old(y_{i,t})))`` (length-normalised), used
    per token through the stop-gradient form of the paper (GSPO-token)::

        s_{i,t} = sg[s_i] * pi(y_{i,t}) / sg[pi(y_{i,t})]       # value s_i, gradient s_i * grad log pi(y_{i,t})

    With ``seq-mean-token-mean`` aggregation and sequence-level advantages, the gradient equals that of
    ``(1/S) sum_i -A_i s_i`` (the GSPO objective). Clipping acts on ``s_i``, so a whole sequence is clipped
    or not; dual-clip applies as in PPO when ``clip_ratio_c`` is set. ``log s_i`` is clamped above at 10.
    The paper's clip range is much narrower than PPO's (3e-4 / 4e-4). ``ratio_*`` metrics report ``s_i``
    (token-weighted); ``ppo_kl`` still uses token log-ratios.
    """
    logp, old_logp, adv, m = _prepare(logp, old_logp, advantages, mask)
    log_ratio = logp - old_logp  # (b, t), 0 at padding
    n_i = m.sum(-1).clamp(min=1).to(logp.dtype)  # (b,)
    seq_log_ratio = log_ratio.sum(-1) / n_i  # (b,) log s_i
    log_s = logp - logp.detach() + seq_log_ratio.detach()[:, None]  # (b, t) value log s_i, grad of log pi_t
    ratio = log_s.clamp(max=GSPO_LOG_RATIO_MAX).exp()  # (b, t)
    loss, low, high, dual = clipped_surrogate(
        ratio, adv, config.clip_eps_low, config.clip_eps_high, config.clip_ratio_c
    )
    loss = torch.where(m, loss, 0)  # (b, t)
    return PolicyLossOutput(loss, _metrics(log_ratio, ratio, low, high, dual, m))
