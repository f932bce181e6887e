"""The reward and verifier registries: lookups, misses that list the valid names, double registration."""

from __future__ import annotations

import pytest

from r1mega.rewards import REWARDS, get_reward
from r1mega.rewards.registry import RewardError, RewardInput, register_reward, register_verifier


def test_builtin_rewards() -> None:
    assert {"accuracy", "format", "language", "overlong", "length"} <= set(REWARDS)
    assert get_reward("accuracy").sandboxed and not get_reward("format").sandboxed
    assert get_reward("length").group and get_reward("length").requires == ("accuracy",)
    assert get_reward("overlong").options == ("overlong_buffer_tokens", "overlong_max_tokens")


def test_config_names_every_registered_reward() -> None:
    """config checks reward.weights against a torch-free copy of the registry; the two must agree."""
    from r1mega.config.schema import REWARD_REQUIRES

    assert REWARD_REQUIRES == {name: spec.requires for name, spec in REWARDS.items()}


def test_unknown_reward_lists_valid_names() -> None:
    with pytest.raises(RewardError, match="choose from .*accuracy"):
        get_reward("acuracy")


def _one(sample: RewardInput) -> float:
    return 1.0


def _two(sample: RewardInput) -> float:
    return 2.0


def test_register_once_per_name() -> None:
    try:
        register_reward("test_only")(_one)
        register_reward("test_only")(_one)  # the same function again (a re-import) is fine
        with pytest.raises(RewardError, match="already registered"):
            register_reward("test_only")(_two)
        assert get_reward("test_only").fn(RewardInput(prompt="", completion="")) == 1.0
    finally:
        REWARDS.pop("test_only", None)


def test_bad_registrations() -> None:
    with pytest.raises(RewardError, match="group reward"):
        register_reward("bad", sandboxed=True, group=True)
    with pytest.raises(RewardError, match="already has"):
        register_verifier("countdown")(_two)
