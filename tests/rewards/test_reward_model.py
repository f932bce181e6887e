"""The reward_model reward: normalisations against hand-computed values, config checks, and a bound model
scoring through the unchanged RewardScorer, mixed with a rule reward (no torch: a stand-in model)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from r1mega.config.errors import ConfigError
from r1mega.config.schema import REWARD_MODEL_NORMALIZE, RewardConfig
from r1mega.rewards import RewardError, RewardInput, RewardScorer
from r1mega.rewards.reward_model import NORMALIZERS, bind_reward_model, normalize_scores


def test_normalisations_by_hand() -> None:
    ln3 = math.log(3.0)
    assert normalize_scores([0.0, ln3], "group_winrate") == pytest.approx([0.25, 0.75])
    # three: i=0 vs (ln3, 0): (0.25 + 0.5) / 2; i=1 vs (0, 0): 0.75; i=2 like i=0
    assert normalize_scores([0.0, ln3, 0.0], "group_winrate") == pytest.approx([0.375, 0.75, 0.375])
    assert normalize_scores([5.0, 5.0], "group_winrate") == [0.5, 0.5]
    assert normalize_scores([7.0], "group_winrate") == [0.5]
    shifted = normalize_scores([100.0, 100.0 + ln3], "group_winrate")  # offset-free
    assert shifted == pytest.approx([0.25, 0.75])
    assert normalize_scores([0.0, ln3, -ln3], "sigmoid") == pytest.approx([0.5, 0.75, 0.25])
    assert normalize_scores([-800.0, 800.0], "sigmoid") == [0.0, 1.0]  # no overflow
    assert normalize_scores([1.0, 3.0], "zscore") == pytest.approx([-1.0, 1.0], abs=1e-5)
    assert normalize_scores([2.0, 2.0], "zscore") == [0.0, 0.0]
    assert normalize_scores([1.5, -2.0], "none") == [1.5, -2.0]
    assert normalize_scores([], "zscore") == []
    with pytest.raises(RewardError, match="choose from"):
        normalize_scores([1.0], "softmax")


def test_schema_names_every_normalisation() -> None:
    assert tuple(NORMALIZERS) == REWARD_MODEL_NORMALIZE


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"weights": {"reward_model": 1.0}}, "reward.reward_model_path"),
        ({"reward_model_normalize": "softmax"}, "reward.reward_model_normalize"),
        ({"reward_model_batch_size": 0}, "reward.reward_model_batch_size"),
    ],
)
def test_config_errors_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        RewardConfig(**kwargs)
    assert error.value.key == key


class LengthModel:
    """Stands in for RewardModelScorer: the longer the completion, the higher the score."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, samples: list[RewardInput]) -> list[float]:
        self.calls.append(len(samples))
        return [float(len(s.completion)) for s in samples]


def test_bound_model_scores_each_group_and_mixes_with_rule_rewards() -> None:
    config = RewardConfig(weights={"format": 1.0, "reward_model": 0.5}, reward_model_path="unused")
    scorer = RewardScorer(config)
    completions = ["a</think>\n\nx", "abc</think>\n\nx", "no think", "ab</think>\n\nx"]
    samples = [
        RewardInput(prompt="p", completion=c, prefix_in_prompt=True, group=str(i // 2))
        for i, c in enumerate(completions)
    ]
    with pytest.raises(RewardError, match="reward.reward_model_path"):
        scorer.score_batch(samples)  # nothing attached yet
    model = LengthModel()
    bind_reward_model(scorer, model)
    out = scorer.score_batch(samples)
    assert model.calls == [2, 2]  # once per GRPO group
    assert [b.values["format"] for b in out] == [1.0, 1.0, 0.0, 1.0]
    # group 0: lengths 12 < 14 -> win rates sigmoid(-2), sigmoid(2); group 1: 8 < 13
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [s(-2), s(2), s(-5), s(5)]
    assert [b.values["reward_model"] for b in out] == pytest.approx(expected)
    assert [b.total for b in out] == pytest.approx([f + 0.5 * r for f, r in zip([1, 1, 0, 1], expected, strict=True)])
    with pytest.raises(RewardError, match="no 'reward_model' reward"):
        bind_reward_model(RewardScorer(RewardConfig(weights={"format": 1.0})), model)


def test_registering_the_reward_imports_no_torch() -> None:
    code = "import sys, r1mega.rewards; print(sorted({'torch', 'megatron', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
    assert "reward_model" in subprocess.run(
        [sys.executable, "-c", "from r1mega.rewards import REWARDS; print(sorted(REWARDS))"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
