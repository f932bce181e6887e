"""GRPOLossConfig: defaults are valid; every bad value names its dotted key, the value and what is valid."""

from __future__ import annotations

import pytest

from r1mega.config.errors import ConfigError
from r1mega.config.schema import GRPOLossConfig


def test_defaults_are_valid() -> None:
    cfg = GRPOLossConfig()
    assert (cfg.adv_estimator, cfg.policy_loss, cfg.loss_agg_mode, cfg.kl_estimator) == (
        "grpo",
        "ppo",
        "token-mean",
        "low_var_kl",
    )


def test_recipes_are_valid() -> None:
    GRPOLossConfig(clip_eps_low=0.2, clip_eps_high=0.28, clip_ratio_c=3.0, kl_coef=0.0)  # DAPO
    GRPOLossConfig(adv_estimator="dr_grpo", loss_agg_mode="seq-mean-token-sum-norm", max_response_length=4096)
    GRPOLossConfig(policy_loss="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4, loss_agg_mode="seq-mean-token-mean")
    GRPOLossConfig(kl_in_reward=True, kl_estimator="k1", entropy_coef=0.001)


@pytest.mark.parametrize(
    "field, value, valid",
    [
        ("adv_estimator", "gae", "one of dr_grpo, grpo, grpo_batch_norm, rloo"),
        ("policy_loss", "ppo2", "one of gspo, ppo"),
        ("loss_agg_mode", "mean", "one of seq-mean-token-mean"),
        ("kl_estimator", "k4", "one of k1, k2, k3, low_var_kl"),
        ("adv_eps", 0.0, "> 0"),
        ("clip_eps_low", 1.0, "[0, 1)"),
        ("clip_eps_low", -0.1, "[0, 1)"),
        ("clip_eps_high", -0.1, ">= 0"),
        ("clip_ratio_c", 1.0, "> 1"),
        ("kl_coef", -0.001, ">= 0"),
        ("entropy_coef", -1.0, ">= 0"),
        ("max_response_length", 0, "positive int"),
        ("rollout_correction", "is", "one of tis, tis_seq"),
        ("rollout_is_cap", 0.5, ">= 1"),
    ],
)
def test_bad_values_raise_config_error(field: str, value: object, valid: str) -> None:
    with pytest.raises(ConfigError) as info:
        GRPOLossConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.key == f"grpo.loss.{field}"
    assert info.value.value == value
    assert valid in info.value.valid
    assert str(info.value).startswith(f"grpo.loss.{field}={value!r} is invalid: expected ")


def test_sum_norm_needs_max_response_length() -> None:
    with pytest.raises(ConfigError, match=r"grpo\.loss\.max_response_length=None .*seq-mean-token-sum-norm"):
        GRPOLossConfig(loss_agg_mode="seq-mean-token-sum-norm")


def test_schema_names_are_the_registries() -> None:
    """The schema validates names without importing torch; they must be exactly what r1mega.rl registers."""
    from r1mega.config import schema
    from r1mega.config.schema_rl import ROLLOUT_CORRECTION_NAMES
    from r1mega.rl.advantages import ADV_ESTIMATORS
    from r1mega.rl.aggregation import LOSS_AGG_MODES
    from r1mega.rl.kl import KL_ESTIMATORS
    from r1mega.rl.policy_loss import POLICY_LOSSES
    from r1mega.rl.rollout_correction import ROLLOUT_CORRECTIONS

    assert list(schema.ADV_ESTIMATOR_NAMES) == sorted(ADV_ESTIMATORS.names())
    assert list(schema.POLICY_LOSS_NAMES) == sorted(POLICY_LOSSES.names())
    assert list(schema.LOSS_AGG_NAMES) == sorted(LOSS_AGG_MODES.names())
    assert list(schema.KL_ESTIMATOR_NAMES) == sorted(KL_ESTIMATORS.names())
    assert list(ROLLOUT_CORRECTION_NAMES) == sorted(ROLLOUT_CORRECTIONS.names())
