"""Task verifiers on real reasoning-gym items, prime factorizations as multisets, countdown's safe checker."""

from __future__ import annotations

import time
from fractions import Fraction
from typing import Any

import pytest
import reasoning_gym

from r1mega.rewards.registry import VERIFIERS, RewardError, RewardInput
from r1mega.rewards.tasks import NUMERIC_TASKS, check_countdown, countdown_problem, factor_multiset


def _items(task: str, n: int = 6) -> list[dict[str, Any]]:
    dataset = reasoning_gym.create_dataset(task, seed=11, size=n)
    return [dataset[i] for i in range(n)]


def _sample(item: dict[str, Any], task: str) -> RewardInput:
    return RewardInput(
        prompt=item["question"], completion="", answer=item["answer"], task=task, metadata=item["metadata"]
    )


@pytest.mark.parametrize("task", [*NUMERIC_TASKS, "prime_factorization", "countdown"])
def test_every_training_task_has_a_verifier(task: str) -> None:
    assert task in VERIFIERS


@pytest.mark.parametrize("task", NUMERIC_TASKS)
def test_numeric_tasks_on_reasoning_gym_items(task: str) -> None:
    for item in _items(task):
        sample = _sample(item, task)
        verify = VERIFIERS[task]
        assert verify(item["answer"], sample) == 1.0
        assert verify(f"{item['answer']}.0" if "." not in item["answer"] else item["answer"] + "0", sample) == 1.0
        assert verify(str(Fraction(item["answer"]) + 1), sample) == 0.0


def test_numeric_fallback_to_math_verify() -> None:
    sample = RewardInput(prompt="q", completion="", answer="42", task="gcd")
    assert VERIFIERS["gcd"]("\\frac{84}{2}", sample) == 1.0
    assert VERIFIERS["gcd"]("x = 42", sample) == 1.0
    assert VERIFIERS["gcd"]("1,000", RewardInput(prompt="q", completion="", answer="1000", task="gcd")) == 1.0
    assert VERIFIERS["gcd"]("43", sample) == 0.0


def test_prime_factorization_on_reasoning_gym_items() -> None:
    for item in _items("prime_factorization"):
        sample = _sample(item, "prime_factorization")
        factors = item["answer"].split(" × ")
        assert VERIFIERS["prime_factorization"](" × ".join(reversed(factors)), sample) == 1.0
        assert VERIFIERS["prime_factorization"](item["answer"] + " × 2", sample) == 0.0


@pytest.mark.parametrize(
    ("answer", "gold", "score"),
    [
        ("2 × 3 × 5", "2 × 3 × 5", 1.0),
        ("5 × 3 × 2", "2 × 3 × 5", 1.0),
        ("2 \\times 2 \\times 3", "2 × 2 × 3", 1.0),
        ("2^2 \\cdot 3", "2 × 2 × 3", 1.0),
        ("2^{2} * 3.", "2 × 2 × 3", 1.0),
        ("2 × 3", "2 × 2 × 3", 0.0),
        ("12", "2 × 2 × 3", 0.0),
        ("2 × 2 × 3 × 1", "2 × 2 × 3", 0.0),
        ("4 × 3", "2 × 2 × 3", 0.0),
        ("two times three", "2 × 3", 0.0),
        ("2^{999} × 3", "2 × 3", 0.0),
    ],
)
def test_prime_factorization_multisets(answer: str, gold: str, score: float) -> None:
    sample = RewardInput(prompt="q", completion="", answer=gold, task="prime_factorization")
    assert VERIFIERS["prime_factorization"](answer, sample) == score


def test_factor_multiset() -> None:
    assert factor_multiset("3 × 113") == {3: 1, 113: 1}
    assert factor_multiset("2^3") == {2: 3}
    assert factor_multiset("2 +3") is None


def test_countdown_on_reasoning_gym_items() -> None:
    for item in _items("countdown"):
        sample = _sample(item, "countdown")
        numbers, target = item["metadata"]["numbers"], item["metadata"]["target"]
        assert VERIFIERS["countdown"](item["answer"], sample) == 1.0
        assert VERIFIERS["countdown"](f"{item['answer']} = {target}", sample) == 1.0
        assert VERIFIERS["countdown"](item["answer"].replace("*", " \\times "), sample) == 1.0
        assert VERIFIERS["countdown"](item["answer"] + " + 0", sample) == 0.0  # a number that was not given
        plain_sum = " + ".join(map(str, numbers))
        assert VERIFIERS["countdown"](plain_sum, sample) == float(sum(numbers) == target)
        # the prompt alone is enough when the metadata is missing
        bare = RewardInput(prompt=item["question"], completion="", answer=item["answer"], task="countdown")
        assert countdown_problem(bare) == (list(numbers), target)


def test_countdown_rules() -> None:
    numbers, target = [6, 61, 94, 4], 309
    assert check_countdown("94*4 - 61 - 6", numbers, target)
    assert check_countdown("(94*4) - (61 + 6)", numbers, target)
    assert not check_countdown("94*4 - 61 - 6 - 0", numbers, target)  # an extra number
    assert not check_countdown("94*4 - 67", numbers, target)  # missing numbers
    assert not check_countdown("94*4 - 61 - 6 + 6 - 6", numbers, target)  # a number used twice
    assert not check_countdown("94*4 - 61 + 6", numbers, target)  # wrong value
    assert check_countdown("6 / 4 * 2", [6, 4, 2], 3)  # exact rational arithmetic


@pytest.mark.parametrize(
    "expression",
    [
        "2**10**10",
        "9**9**9",
        "94*4 - 61 - 6/0",
        "94*4 - 61 - 6/(4-4)",
        "__import__('os').system('true')",
        "x + 94*4 - 61 - 6",
        "abs(94*4 - 61 - 6)",
        "(94).__class__",
        "().__class__.__bases__[0].__subclasses__()",
        "[94*4 - 61 - 6][0]",
        "1e999999",
        "9" * 100_000,
        "(" * 100_000,
        "\x00",
        "94*4 - 61 - 6 = 309 = 309",
    ],
)
def test_countdown_hostile_expressions_are_wrong_and_fast(expression: str) -> None:
    start = time.perf_counter()
    assert not check_countdown(expression, [6, 61, 94, 4], 309)
    assert time.perf_counter() - start < 0.1


def test_countdown_without_numbers_is_a_data_error() -> None:
    with pytest.raises(RewardError, match="numbers"):
        VERIFIERS["countdown"]("1 + 2", RewardInput(prompt="Make 3.", completion="", task="countdown"))
