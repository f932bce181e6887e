"""Rollout/trainer mismatch corrections: truncated importance sampling (TIS) on the policy loss.

The rollout engine and the trainer compute the same policy with different kernels (bf16 rounding, reordered
sums, an MoE router's top-k flipped by rounding), so the log-probabilities the tokens were sampled with,
``pi_rollout``, differ from the trainer's ``pi_old`` for the same weights: the update is slightly off-policy.
With a correction on, the GRPO stage recomputes ``pi_old`` with the trainer (the PPO ratio's denominator) and
weights each token's policy loss by the importance ratio of the trainer's old policy to the sampler,
truncated at ``C`` (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
training")::

    w_t = min(pi_old(y_t) / pi_rollout(y_t), C)                          # tis: per token
    w_i = min(prod_t pi_old(y_t) / pi_rollout(y_t), C), for every token  # tis_seq: per sequence

Every correction is registered by name with the signature
``(old_logp (b,t), rollout_logp (b,t), mask (b,t), cap) -> RolloutCorrection`` and returns detached weights
``(b, t)`` (exactly 0 at padding) plus scalar metrics over the valid tokens: ``rollout_is_mean`` (mean
weight), ``rollout_is_clipfrac`` (share of weights truncated at ``C``), ``rollout_logp_gap`` and
``rollout_logp_gap_max`` (mean and max ``|log pi_old - log pi_rollout|``: the mismatch itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from r1mega.rl.metrics import masked_mean
from r1mega.rl.registry import Registry


class RolloutCorrection(NamedTuple):
    """What a rollout correction returns."""

    weights: Tensor
    """Per-token weights ``(b, t)`` of the policy loss, detached, exactly 0 at padding."""
    metrics: dict[str, Tensor]
    """Detached scalar metrics over the valid tokens."""


RolloutCorrectionFn = Callable[[Tensor, Tensor, Tensor, float], RolloutCorrection]
"""``(old_logp, rollout_logp, mask, cap) -> RolloutCorrection``."""

ROLLOUT_CORRECTIONS: Registry[RolloutCorrectionFn] = Registry("rollout correction")
register_rollout_correction = ROLLOUT_CORRECTIONS.register
get_rollout_correction = ROLLOUT_CORRECTIONS.get


def _log_ratio(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``log pi_old - log pi_rollout`` (b, t), 0 at padding (replaced, so NaN padding stays out), and the
    boolean mask."""
    m = mask.bool()
    if old_logp.shape != rollout_logp.shape or old_logp.shape != m.shape:
        raise ValueError(
            f"old_logp {tuple(old_logp.shape)}, rollout_logp {tuple(rollout_logp.shape)} and mask "
            f"{tuple(mask.shape)} must all have the same (batch, response_tokens) shape"
        )
    return torch.where(m, old_logp.detach() - rollout_logp.detach(), 0.0), m  # (b, t)


@torch.no_grad()
def _metrics(weights: Tensor, truncated: Tensor, log_ratio: Tensor, m: Tensor) -> dict[str, Tensor]:
    gap = log_ratio.abs()  # (b, t)
    return {
        "rollout_is_mean": masked_mean(weights, m),
        "rollout_is_clipfrac": masked_mean(truncated.float(), m),
        "rollout_logp_gap": masked_mean(gap, m),
        "rollout_logp_gap_max": gap.max() if m.any() else gap.new_zeros(()),
    }


@register_rollout_correction("tis")
def token_tis(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cap: float) -> RolloutCorrection:
    """Token-level truncated importance sampling: ``w_t = min(exp(log pi_old - log pi_rollout), cap)``."""
    log_ratio, m = _log_ratio(old_logp, rollout_logp, mask)
    truncated = log_ratio > math.log(cap)  # (b, t)
    weights = torch.where(m, log_ratio.clamp(max=math.log(cap)).exp(), 0.0)  # (b, t)
    return RolloutCorrection(weights, _metrics(weights, truncated & m, log_ratio, m))


@register_rollout_correction("tis_seq")
def sequence_tis(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cap: float) -> RolloutCorrection:
    """Sequence-level truncated importance sampling: every token of sequence ``i`` gets
    ``w_i = min(exp(sum_t log pi_old - log pi_rollout), cap)``."""
    log_ratio, m = _log_ratio(old_logp, rollout_logp, mask)
    seq = log_ratio.sum(dim=-1, keepdim=True)  # (b, 1) log of the sequence's ratio
    truncated = (seq > math.log(cap)).expand_as(m)  # (b, t)
    weights = torch.where(m, seq.clamp(max=math.log(cap)).exp().expand_as(m), 0.0)  # (b, t)
    return RolloutCorrection(weights, _metrics(weights, truncated & m, log_ratio, m))
