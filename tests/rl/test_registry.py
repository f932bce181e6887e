"""The name -> function registries: registration, lookup, and a lookup miss that lists the valid names."""

from __future__ import annotations

import pytest

from r1mega.rl.advantages import ADV_ESTIMATORS
from r1mega.rl.aggregation import LOSS_AGG_MODES
from r1mega.rl.kl import KL_ESTIMATORS
from r1mega.rl.policy_loss import POLICY_LOSSES
from r1mega.rl.registry import Registry


def test_register_and_get() -> None:
    reg: Registry = Registry("widget")

    @reg.register("b")
    def b() -> int:
        return 2

    reg.register("a")(lambda: 1)
    assert reg.get("b") is b and reg.get("a")() == 1
    assert reg.names() == ("a", "b")
    assert "a" in reg and "c" not in reg


def test_miss_lists_valid_names() -> None:
    reg: Registry = Registry("widget")
    reg.register("x")(lambda: 0)
    reg.register("y")(lambda: 0)
    with pytest.raises(KeyError, match=r"unknown widget 'z'; valid: x, y"):
        reg.get("z")


def test_duplicate_name_raises() -> None:
    reg: Registry = Registry("widget")
    reg.register("x")(lambda: 0)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x")(lambda: 1)


def test_registered_names() -> None:
    assert ADV_ESTIMATORS.names() == ("dr_grpo", "grpo", "grpo_batch_norm", "rloo")
    assert POLICY_LOSSES.names() == ("gspo", "ppo")
    assert LOSS_AGG_MODES.names() == (
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
        "token-mean",
    )
    assert KL_ESTIMATORS.names() == ("k1", "k2", "k3", "low_var_kl")
    with pytest.raises(KeyError, match="valid: dr_grpo, grpo, grpo_batch_norm, rloo"):
        ADV_ESTIMATORS.get("ppo")
