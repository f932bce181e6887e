"""The accuracy reward through the real verifier pool: equivalent and non-equivalent answers, the cold-start set."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction

import pytest

from r1mega.data.coldstart import eval_prompt, generate_cold_start
from r1mega.rewards import VerifierPool, clip_to_answer
from r1mega.rewards.accuracy import accuracy
from r1mega.rewards.registry import RewardError, RewardInput

EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    ("0.50", "\\frac12"),
    ("1/2", "\\frac{1}{2}"),
    ("\\tfrac{3}{4}", "0.75"),
    ("\\frac{6}{4}", "1.5"),
    ("\\dfrac{4}{2}", "2"),
    ("\\$1,157.63", "1157.63"),
    ("1,157.63", "1157.63"),
    ("1{,}000", "1000"),
    ("1\\,000", "1000"),
    ("10^3", "1000"),
    ("2^{3}", "8"),
    ("50\\%", "50"),
    ("50\\%", "50\\%"),
    ("x=3", "3"),
    ("x = 3", "3"),
    ("10.0", "10"),
    ("- 4", "-4"),
    ("10 \\text{ apples}", "10"),
    ("5 \\text{ cm}^2", "5"),
    ("12^\\circ", "12"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("3\\sqrt{2}", "\\sqrt{18}"),
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2"),
    ("1+x", "x+1"),
    ("2\\pi", "\\pi \\cdot 2"),
    ("\\{2,1\\}", "\\{1,2\\}"),
    ("0.333333", "\\frac{1}{3}"),
    ("\\frac{1}{3}", "0.333333"),
]

NOT_EQUIVALENT = [
    ("0.6", "0.5"),
    ("50\\%", "0.5"),  # a percent sign is dropped, not divided out (see r1mega.rewards.equivalence)
    ("0.33", "\\frac{1}{3}"),
    ("3.14159", "\\pi"),
    ("1.41", "\\sqrt{2}"),
    ("x=4", "3"),
    ("2", "3"),
    ("1157.64", "1157.63"),
    ("x+2", "x+1"),
    ("(2,1)", "(1,2)"),
    ("100", "1000"),
    ("4", "-4"),
    ("2", "\\frac{1}{2}"),
    ("b", "a"),
    ("21", "12"),
    ("\\{1,3\\}", "\\{1,2\\}"),
]


@pytest.fixture(scope="module")
def pool() -> Iterator[VerifierPool]:
    """A pool with a generous limit: these tests check answers, not timing, and the CI machine may be busy
    (some math-verify comparisons, such as a tuple against an interval, take 0.3-1 s on a loaded machine)."""
    with VerifierPool(num_workers=2, time_limit_s=10.0) as p:
        yield p


def _score(pool: VerifierPool, samples: list[RewardInput]) -> list[float]:
    results = pool.map(accuracy, [clip_to_answer(s, 1000) for s in samples])
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    return [r.value for r in results]


def _boxed(answer: str, gold: str, task: str | None = None) -> RewardInput:
    return RewardInput(
        prompt="q", completion=f"<think>\nwork\n</think>\nThe answer is $\\boxed{{{answer}}}$.", answer=gold, task=task
    )


@pytest.mark.parametrize(("answer", "gold"), EQUIVALENT)
def test_equivalent_answers_score_one(pool: VerifierPool, answer: str, gold: str) -> None:
    assert _score(pool, [_boxed(answer, gold)]) == [1.0]


@pytest.mark.parametrize(("answer", "gold"), NOT_EQUIVALENT)
def test_different_answers_score_zero(pool: VerifierPool, answer: str, gold: str) -> None:
    assert _score(pool, [_boxed(answer, gold)]) == [0.0]


def test_in_process_and_pool_agree() -> None:
    # In-process calls are for trusted text only (tests); the scorer always goes through the pool.
    assert accuracy(_boxed("\\frac{1}{2}", "0.5")) == 1.0
    assert accuracy(RewardInput(prompt="q", completion="<think>no answer", answer="1")) == 0.0
    assert accuracy(RewardInput(prompt="q", completion="<think>r</think>", answer="1")) == 0.0
    with pytest.raises(RewardError):
        accuracy(_boxed("1 + 2", "3", task="countdown"))


def test_only_the_final_boxed_answer_counts(pool: VerifierPool) -> None:
    samples = [
        RewardInput(prompt="q", completion="<think>maybe \\boxed{5}</think> so \\boxed{4}", answer="5"),
        RewardInput(prompt="q", completion="<think>maybe \\boxed{4}</think> so \\boxed{5}", answer="5"),
        RewardInput(prompt="q", completion="maybe \\boxed{5}\n</think> no box", answer="5", prefix_in_prompt=True),
        RewardInput(prompt="q", completion="\\boxed{5}", answer="5", prefix_in_prompt=True),  # think never closed
    ]
    assert _score(pool, samples) == [0.0, 1.0, 0.0, 0.0]


def test_cold_start_eval_set(pool: VerifierPool) -> None:
    # The held-out prompts of the default cold-start set (all 8 tasks), built here: data/ is not in git.
    _, held_out = generate_cold_start(num_train=8, num_eval=200, seed=0)
    rows = [eval_prompt(r) for r in held_out]
    right, wrong = [], []
    for row in rows:
        right.append(_boxed(row["answer"], row["answer"], row["task"]))
        if row["task"] == "prime_factorization":
            bad = row["answer"] + " × 2"
        else:
            bad = str(Fraction(row["answer"]) + 1)
        wrong.append(_boxed(bad, row["answer"], row["task"]))
    assert len({row["task"] for row in rows}) == 8
    assert _score(pool, right) == [1.0] * len(rows)
    assert _score(pool, wrong) == [0.0] * len(rows)
