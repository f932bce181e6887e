"""Exact numbers and math-verify equivalence in-process (trusted strings only; model text goes to the pool)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from r1mega.rewards import equivalence
from r1mega.rewards.equivalence import math_equal, normalize_latex, numeric_value, strip_percent


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", Fraction(42)),
        ("-4", Fraction(-4)),
        ("1,157.63", Fraction("1157.63")),
        ("\\$1,157.63", Fraction("1157.63")),
        ("$12.50$", Fraction("12.5")),
        ("1\\,000", Fraction(1000)),
        ("50\\%", Fraction(50)),
        ("7.", Fraction(7)),
        (".5", Fraction(1, 2)),
        ("1,00", None),
        ("3,4", None),
        ("\\frac{1}{2}", None),
        ("x = 3", None),
        ("9" * 100, None),
        ("", None),
    ],
)
def test_numeric_value(text: str, value: Fraction | None) -> None:
    assert numeric_value(text) == value


def test_normalization() -> None:
    assert strip_percent("50\\%") == "50" and strip_percent("50 %") == "50" and strip_percent("50\\text{\\%}") == "50"
    assert normalize_latex(" 1\\,000\\,000 ") == "1000000"
    assert normalize_latex("x\\,dx") == "x\\,dx"


def test_math_equal() -> None:
    assert math_equal("\\frac{1}{2}", "0.5")
    assert math_equal("x = 3", "3")
    assert not math_equal("0.6", "0.5")
    assert not math_equal("\\text{no idea}", "3")
    assert not math_equal("", "3")


def test_warm_up_runs_once() -> None:
    equivalence.warm_up()
    assert equivalence._warm
    equivalence.warm_up()  # a no-op
