"""``GRPOLossConfig``: the knobs of the GRPO objective (advantages, clipping, aggregation, KL, entropy).

Meant to become the ``grpo.loss`` group of the Hydra schema; the dotted keys in error messages already
say ``grpo.loss.<field>``. Names of estimators, losses and modes are checked against their registries,
so a typo fails when the config is built, with the valid names.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1mega.config.errors import ConfigError
from r1mega.rl.advantages import ADV_ESTIMATORS
from r1mega.rl.aggregation import LOSS_AGG_MODES
from r1mega.rl.kl import KL_ESTIMATORS
from r1mega.rl.policy_loss import POLICY_LOSSES
from r1mega.rl.registry import Registry

KEY = "grpo.loss"
"""Dotted prefix of this group's keys in error messages."""


def _check_registered(field: str, value: str, registry: Registry) -> None:
    if value not in registry:
        raise ConfigError(f"{KEY}.{field}", value, f"one of {', '.join(registry.names())}")


def _check_at_least(field: str, value: float, low: float, strict: bool = False) -> None:
    if value < low or (strict and value == low):
        raise ConfigError(f"{KEY}.{field}", value, f"a number {'>' if strict else '>='} {low}")


@dataclass
class GRPOLossConfig:
    """How rewards become advantages and how the policy loss is formed, clipped, aggregated and regularised."""

    adv_estimator: str = "grpo"
    """Advantage estimator: grpo ((r-mean)/(std+eps), unbiased group std), dr_grpo (r-mean), grpo_batch_norm
    (group-centred, divided by the batch std) or rloo (leave-one-out baseline). Dr. GRPO's "no std" is
    chosen here, so there is no separate norm_adv_by_std switch."""
    adv_eps: float = 1e-6
    """Added to the std in grpo and grpo_batch_norm: A = (r - mean) / (std + adv_eps)."""
    clip_eps_low: float = 0.2
    """Lower PPO clip: the ratio is clipped below at 1 - clip_eps_low (for negative advantages)."""
    clip_eps_high: float = 0.2
    """Upper PPO clip: the ratio is clipped above at 1 + clip_eps_high (for positive advantages).
    DAPO's clip-higher uses 0.28 with clip_eps_low 0.2; GSPO uses 4e-4 with 3e-4."""
    clip_ratio_c: float | None = None
    """Dual-clip bound (> 1, typically 3): for negative advantages the per-token loss is capped at
    -A * clip_ratio_c, so a huge ratio cannot blow up the loss. None turns dual-clip off."""
    policy_loss: str = "ppo"
    """Policy loss: ppo (token-level ratio, clipped surrogate) or gspo (sequence-level ratio)."""
    loss_agg_mode: str = "token-mean"
    """How per-token losses become a scalar: token-mean, seq-mean-token-mean (GRPO paper),
    seq-mean-token-sum, or seq-mean-token-sum-norm (Dr. GRPO; needs max_response_length)."""
    kl_coef: float = 0.001
    """Weight of the KL(pi || pi_ref) regulariser; 0 turns it off (and the reference model is not needed)."""
    kl_estimator: str = "low_var_kl"
    """KL estimator: k1, k2, k3 or low_var_kl (k3 clamped to [-10, 10], verl's default for the KL loss)."""
    kl_in_reward: bool = False
    """Subtract kl_coef * sum_t KL_t(pi_old || pi_ref) from the reward before the advantages instead of
    adding kl_coef * KL to the loss (never both)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus: the loss gets - entropy_coef * aggregated entropy. 0 turns it off."""
    max_response_length: int | None = None
    """Constant normaliser of seq-mean-token-sum-norm (set it to the generation limit); None for other modes."""

    def __post_init__(self) -> None:
        _check_registered("adv_estimator", self.adv_estimator, ADV_ESTIMATORS)
        _check_registered("policy_loss", self.policy_loss, POLICY_LOSSES)
        _check_registered("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _check_registered("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_at_least("adv_eps", self.adv_eps, 0.0, strict=True)
        if not 0.0 <= self.clip_eps_low < 1.0:
            raise ConfigError(f"{KEY}.clip_eps_low", self.clip_eps_low, "a number in [0, 1) so that 1 - eps > 0")
        _check_at_least("clip_eps_high", self.clip_eps_high, 0.0)
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ConfigError(f"{KEY}.clip_ratio_c", self.clip_ratio_c, "None (off) or a number > 1, e.g. 3.0")
        _check_at_least("kl_coef", self.kl_coef, 0.0)
        _check_at_least("entropy_coef", self.entropy_coef, 0.0)
        if self.max_response_length is not None and self.max_response_length <= 0:
            raise ConfigError(f"{KEY}.max_response_length", self.max_response_length, "None or a positive int")
        if self.loss_agg_mode == "seq-mean-token-sum-norm" and self.max_response_length is None:
            raise ConfigError(
                f"{KEY}.max_response_length",
                None,
                "a positive int (the generation limit) when loss_agg_mode is seq-mean-token-sum-norm",
            )
