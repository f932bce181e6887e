"""``GRPOLossConfig``: the knobs of the GRPO objective (advantages, clipping, aggregation, KL, entropy).

It is the ``grpo.loss`` group of the Hydra schema and lives in ``r1mega.config.schema`` with the names of the
registered estimators, losses and modes (composing a config must not import torch); re-exported here.
"""

from r1mega.config.schema import (
    ADV_ESTIMATOR_NAMES,
    KL_ESTIMATOR_NAMES,
    LOSS_AGG_NAMES,
    POLICY_LOSS_NAMES,
    GRPOLossConfig,
)

KEY = "grpo.loss"
"""Dotted prefix of this group's keys in error messages."""

__all__ = ["ADV_ESTIMATOR_NAMES", "KEY", "KL_ESTIMATOR_NAMES", "LOSS_AGG_NAMES", "POLICY_LOSS_NAMES", "GRPOLossConfig"]
