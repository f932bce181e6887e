"""Answer verifiers for the reasoning-gym tasks used in training, registered by task name.

Each takes the extracted final answer and the sample and returns 1.0 (correct) or 0.0. They run in the
verifier workers (``accuracy`` is sandboxed), so the math-verify fallback is safe to call; countdown never
touches sympy: its expression goes through ``r1mega.rewards.arith``'s ``ast`` evaluator.

- numeric tasks (the cold-start set, ``r1mega.data.coldstart``): the answer's exact value equals the
  ground truth; non-plain answers (``\\frac{84}{2}``, ``x = 42``) fall back to math-verify;
- ``prime_factorization``: the factors as a multiset (``3 × 2 × 5`` = ``2 × 3 × 5``; ``2^2`` counts twice);
- ``countdown``: the expression uses exactly the given numbers (each once) and equals the target.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

from r1mega.rewards.arith import UnsafeExpressionError, evaluate, literals, normalize_expression, parse_arithmetic
from r1mega.rewards.equivalence import math_equal, numeric_value
from r1mega.rewards.registry import RewardError, RewardInput, register_verifier

NUMERIC_TASKS = (
    "gsm_symbolic",
    "chain_sum",
    "basic_arithmetic",
    "products",
    "gcd",
    "lcm",
    "leg_counting",
)
"""reasoning-gym tasks whose answer is one number."""

_FACTOR_SEPARATORS = re.compile(r"\\times|\\cdot|[×*·⋅]")
_FACTOR = re.compile(r"(\d{1,30})(?:\s*\^\s*(\d{1,3}))?")
_MAX_FACTORS = 256
_COUNTDOWN_PROMPTS = (  # reasoning-gym 0.1.25's three countdown templates: (target group, numbers group)
    (re.compile(r"(?:Calculate|Find a way to make) (-?\d+) using all of these numbers: (\d+(?:, \d+)*)"), 1, 2),
    (re.compile(r"Using all the numbers (\d+(?:, \d+)*), create an expression that equals (-?\d+)"), 2, 1),
)


def verify_math(answer: str, sample: RewardInput) -> float:
    """Math-verify equivalence with the ground truth (the fallback for tasks without a verifier)."""
    return 1.0 if math_equal(answer, sample.answer) else 0.0


def _verify_numeric(answer: str, sample: RewardInput) -> float:
    """The answer's exact value equals the ground truth; math-verify for answers that are not plain numbers."""
    value, gold = numeric_value(answer), numeric_value(sample.answer)
    if value is not None and gold is not None:
        return 1.0 if value == gold else 0.0
    return verify_math(answer, sample)


for _task in NUMERIC_TASKS:
    register_verifier(_task)(_verify_numeric)


def factor_multiset(text: str) -> Counter[int] | None:
    """Prime factors written as a product (``2 × 2 × 3``, ``2^2 \\cdot 3``) as a multiset; None if malformed."""
    text = text.strip().strip("$").rstrip(".").replace("\\,", " ").replace("{", "").replace("}", "")
    parts = _FACTOR_SEPARATORS.split(text)
    if len(parts) > _MAX_FACTORS:
        return None
    factors: Counter[int] = Counter()
    for part in parts:
        match = _FACTOR.fullmatch(part.strip())
        if match is None:
            return None
        exponent = int(match.group(2) or 1)
        if exponent < 1 or sum(factors.values()) + exponent > _MAX_FACTORS:
            return None
        factors[int(match.group(1))] += exponent
    return factors


@register_verifier("prime_factorization")
def verify_prime_factorization(answer: str, sample: RewardInput) -> float:
    """The same prime factors with the same multiplicities as the ground truth, in any order."""
    got, want = factor_multiset(answer), factor_multiset(sample.answer)
    if want is None:
        raise RewardError(f"prime_factorization ground truth {sample.answer!r} is not a product of numbers.")
    return 1.0 if got == want else 0.0


def countdown_problem(sample: RewardInput) -> tuple[list[int], int]:
    """(numbers, target) of a countdown sample: reasoning-gym's metadata, else read from the prompt."""
    if "numbers" in sample.metadata and "target" in sample.metadata:
        return [int(n) for n in sample.metadata["numbers"]], int(sample.metadata["target"])
    for pattern, target, numbers in _COUNTDOWN_PROMPTS:
        match = pattern.search(sample.prompt)
        if match is not None:
            return [int(n) for n in match.group(numbers).split(", ")], int(match.group(target))
    raise RewardError(
        "A countdown sample needs metadata 'numbers' and 'target' (reasoning-gym's metadata) "
        "or one of reasoning-gym's countdown prompts ('Calculate T using all of these numbers: a, b, c')."
    )


def check_countdown(expression: str, numbers: Sequence[int], target: int) -> bool:
    """Whether ``expression`` uses each of ``numbers`` exactly once (no others) and evaluates to ``target``.

    A trailing ``= target`` is tolerated. Hostile expressions (powers, names, calls, huge literals, division
    by zero) are simply wrong.
    """
    text = normalize_expression(expression)
    if text.count("=") == 1:
        text = text.split("=")[0]
    try:
        tree = parse_arithmetic(text.strip())
        used = literals(tree)
        if Counter(used) != Counter(Fraction(n) for n in numbers):
            return False
        return evaluate(tree) == target
    except (UnsafeExpressionError, ZeroDivisionError):
        return False


@register_verifier("countdown")
def verify_countdown(answer: str, sample: RewardInput) -> float:
    """reasoning-gym countdown: the expression reaches the target with exactly the given numbers."""
    numbers, target = countdown_problem(sample)
    return 1.0 if check_countdown(answer, numbers, target) else 0.0
