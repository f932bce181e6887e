"""RewardConfig validation and the scorer: weighted totals, groups, failures, metrics."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from r1mega.config.errors import ConfigError
from r1mega.config.schema import RewardConfig
from r1mega.rewards import RewardError, RewardInput, RewardScorer, VerifierPool, batch_metrics

THINK = "<think>\nLet me add them up.\n</think>\n"


def test_config_defaults_and_overrides_compose() -> None:
    cfg = OmegaConf.to_object(OmegaConf.structured(RewardConfig))
    assert cfg.weights == {"accuracy": 1.0, "format": 1.0, "language": 1.0}
    merged = OmegaConf.merge(OmegaConf.structured(RewardConfig), OmegaConf.from_dotlist(["weights.overlong=0.5"]))
    assert OmegaConf.to_object(merged).weights["overlong"] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"weights": {"acuracy": 1.0}}, "reward.weights.acuracy"),
        ({"weights": {"format": float("nan")}}, "reward.weights.format"),
        ({"weights": {"length": 0.1}}, "reward.weights.accuracy"),
        ({"time_limit_s": 0}, "reward.time_limit_s"),
        ({"num_workers": 0}, "reward.num_workers"),
        ({"start_method": "fork"}, "reward.start_method"),
        ({"max_answer_chars": 0}, "reward.max_answer_chars"),
        ({"worker_memory_mb": -1}, "reward.worker_memory_mb"),
        ({"overlong_buffer_tokens": 0}, "reward.overlong_buffer_tokens"),
    ],
)
def test_config_errors_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        RewardConfig(**kwargs)
    assert error.value.key == key
    assert str(error.value).startswith(key)


def test_unknown_reward_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match="registered reward: accuracy, format, language, length, overlong"):
        RewardConfig(weights={"acuracy": 1.0})


def _sample(answer: str, gold: str, tokens: int, prompt: str = "What is 3 + 4?", **kw: object) -> RewardInput:
    return RewardInput(
        prompt=prompt,
        completion=f"{THINK}The answer is \\boxed{{{answer}}}.",
        answer=gold,
        completion_tokens=tokens,
        max_tokens=1000,
        **kw,
    )


def test_weighted_total_and_groups(pool: VerifierPool) -> None:
    weights = {"accuracy": 1.0, "format": 0.5, "language": 0.25, "overlong": 2.0, "length": 0.1}
    cfg = RewardConfig(weights=weights, overlong_buffer_tokens=400)
    samples = [
        _sample("7", "7", 100),
        _sample("8", "7", 300),
        _sample("\\frac{14}{2}", "7", 800),  # overlong: (600 - 800) / 400 = -0.5
        _sample("5", "5", 100, prompt="What is 2 + 3?"),  # a group of its own
        RewardInput(prompt="What is 3 + 4?", completion="7", answer="7", completion_tokens=200, max_tokens=1000),
    ]
    out = RewardScorer(cfg, pool=pool).score_batch(samples)
    assert [b.values["accuracy"] for b in out] == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert [b.values["format"] for b in out] == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert [b.values["language"] for b in out] == [1.0] * 5
    assert [b.values["overlong"] for b in out] == pytest.approx([0.0, 0.0, -0.5, 0.0, 0.0])
    # group "What is 3 + 4?": lengths 100, 300, 800, 200 -> lambda = 0.5 - (L - 100) / 700
    assert [b.values["length"] for b in out] == pytest.approx(
        [0.5, min(0.0, 0.5 - 200 / 700), -0.5, 0.0, 0.5 - 100 / 700]
    )
    for b in out:
        assert b.total == pytest.approx(sum(w * b.values[n] for n, w in weights.items()))
        assert not b.failures and not b.timed_out
    assert out[0].total == pytest.approx(1.0 + 0.5 + 0.25 + 0.0 + 0.05)


def test_explicit_group_ids(pool: VerifierPool) -> None:
    cfg = RewardConfig(weights={"accuracy": 0.0, "length": 1.0})
    samples = [_sample("7", "7", 100, group="a"), _sample("7", "7", 300, group="b"), _sample("7", "7", 200, group="a")]
    out = RewardScorer(cfg, pool=pool).score_batch(samples)
    assert [b.values["length"] for b in out] == pytest.approx([0.5, 0.0, -0.5])
    assert [b.total for b in out] == pytest.approx([0.5, 0.0, -0.5])


def test_failures_are_reported_and_score_zero(pool: VerifierPool) -> None:
    cfg = RewardConfig(weights={"accuracy": 1.0, "format": 1.0})
    out = RewardScorer(cfg, pool=pool).score_batch([_sample("9^{9^{9^9}}", "7", 10), _sample("7", "7", 10)])
    assert out[0].values == {"accuracy": 0.0, "format": 1.0} and out[0].timed_out
    assert out[0].failures == {"accuracy": "timeout"} and out[0].total == 1.0
    assert out[1].total == 2.0 and not out[1].failures
    metrics = batch_metrics(out)
    assert metrics["reward/total"] == 1.5 and metrics["reward/accuracy"] == 0.5
    assert metrics["reward/timeout_rate"] == 0.5 and metrics["reward/failure_rate"] == 0.5
    assert metrics["reward/verify_s_max"] >= 0.5 * pool.time_limit_s
    assert batch_metrics([]) == {}


def test_bad_data_in_the_pool_is_raised(pool: VerifierPool) -> None:
    cfg = RewardConfig(weights={"accuracy": 1.0})
    with pytest.raises(RewardError, match="countdown"):
        RewardScorer(cfg, pool=pool).score_batch([_sample("1 + 2", "3", 10, task="countdown")])


def test_in_process_rewards_need_no_pool() -> None:
    scorer = RewardScorer(RewardConfig(weights={"format": 1.0, "overlong": 1.0}, overlong_buffer_tokens=500))
    assert not scorer.needs_pool
    out = scorer.score_batch([_sample("7", "7", 750)])
    assert out[0].values == {"format": 1.0, "overlong": -0.5}
    assert scorer._pool is None


def test_scorer_owns_and_closes_its_pool() -> None:
    with RewardScorer(RewardConfig(num_workers=1, time_limit_s=2.0)) as scorer:
        assert scorer.needs_pool
        out = scorer.score_batch([_sample("7", "7", 10)])
        pool = scorer._pool
    assert out[0].total == 3.0
    assert scorer._pool is None and pool is not None and pool.pids == []
