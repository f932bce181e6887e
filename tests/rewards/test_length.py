"""DAPO's overlong penalty and Kimi-1.5's length reward against hand-computed values."""

from __future__ import annotations

import pytest

from r1mega.rewards.length import dapo_overlong_penalty, kimi_length_rewards, length, overlong
from r1mega.rewards.registry import RewardError, RewardInput


@pytest.mark.parametrize(
    ("length_", "value"),
    [(0, 0.0), (600, 0.0), (601, -0.0025), (700, -0.25), (800, -0.5), (999, -0.9975), (1000, -1.0), (1001, -1.0)],
)
def test_dapo_overlong(length_: int, value: float) -> None:
    # L_max = 1000, L_cache = 400: no penalty up to 600 tokens, then (600 - L) / 400, -1 past 1000.
    assert dapo_overlong_penalty(length_, 1000, 400) == pytest.approx(value)


def test_dapo_buffer_larger_than_limit_is_clipped() -> None:
    assert dapo_overlong_penalty(50, 100, 4096) == pytest.approx(-0.5)


def test_overlong_reward_reads_the_sample_or_the_option() -> None:
    sample = RewardInput(prompt="q", completion="c", completion_tokens=900, max_tokens=1000)
    assert overlong(sample, overlong_buffer_tokens=200) == pytest.approx(-0.5)
    assert overlong(sample, overlong_buffer_tokens=200, overlong_max_tokens=2000) == 0.0
    assert overlong(sample, overlong_buffer_tokens=200, overlong_max_tokens=850) == -1.0
    with pytest.raises(RewardError, match="max_tokens"):
        overlong(RewardInput(prompt="q", completion="c", completion_tokens=5))


def test_kimi_length_reward() -> None:
    # lengths 100..300: lambda = 0.5 - (L - 100) / 200 = 0.5, 0.0, -0.5
    assert kimi_length_rewards([100, 200, 300], [True, True, True]) == pytest.approx([0.5, 0.0, -0.5])
    assert kimi_length_rewards([100, 200, 300], [False, True, False]) == pytest.approx([0.0, 0.0, -0.5])
    assert kimi_length_rewards([150, 100, 300, 250], [True, False, True, False]) == pytest.approx(
        [0.25, 0.0, -0.5, -0.25]
    )
    assert kimi_length_rewards([7, 7], [True, False]) == [0.0, 0.0]
    assert kimi_length_rewards([], []) == []
    with pytest.raises(RewardError):
        kimi_length_rewards([1, 2], [True])


def test_length_group_reward_reads_accuracy() -> None:
    samples = [RewardInput(prompt="q", completion="c", completion_tokens=n) for n in (10, 20, 30)]
    values = [{"accuracy": 1.0}, {"accuracy": 0.0}, {"accuracy": 1.0}]
    assert length(samples, values) == pytest.approx([0.5, 0.0, -0.5])
