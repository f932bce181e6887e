"""Is an extracted answer equal to the ground truth? Exact numbers first, then HF's math-verify.

``numeric_value`` reads plain numbers (``1,157.63``, ``\\$5``, ``-4``, ``12.50``) with ``Fraction`` and no
sympy, which settles most integer-answer tasks in microseconds. Anything else goes to math-verify
(``parse`` + ``verify``), which understands LaTeX: ``\\frac{1}{2}`` = ``0.5``, ``x=3`` = ``3``,
``\\{1,2\\}`` = ``\\{2,1\\}``, ``\\sqrt{8}`` = ``2\\sqrt{2}``, units in ``\\text{}`` dropped.

Model text is parsed only with math-verify's LaTeX extraction (latex2sympy's grammar); its plain-expression
extraction, which goes through sympy's ``parse_expr`` and so ``eval``, is used for the trusted ground truth
only. math-verify's own ``signal.alarm`` timeouts are off: these functions run in the verifier workers,
whose time limit covers them (and work in any thread). Never call them on model text in the trainer.

Percentages: math-verify 0.9.0 reads ``$50\\%$`` as 50, ``\\boxed{50\\%}`` as an unparsed string and a bare
``50%`` as 1/2. Here a trailing percent sign is dropped on both sides, so ``50\\%`` equals ``50`` and not
``0.5`` (the usual grading of "what percent ..." questions, whose ground truth is the number).
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction
from typing import Any

_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
_THIN_SPACE_IN_NUMBER = re.compile(r"(?<=\d)(?:\\,|\\!|\\ |\{,\}|~)(?=\d{3})")
_PERCENT = re.compile(r"\s*(?:\\%|%|\\text\{\s*\\?%\s*\})\s*$")
_MAX_NUMBER_CHARS = 64


def strip_percent(text: str) -> str:
    """``50\\%`` -> ``50`` (a trailing percent sign, LaTeX or plain)."""
    return _PERCENT.sub("", text)


def normalize_latex(text: str) -> str:
    """Small fixes math-verify misses: digit-group thin spaces (``1\\,000``), a trailing percent sign."""
    return strip_percent(_THIN_SPACE_IN_NUMBER.sub("", text.strip()))


def numeric_value(text: str) -> Fraction | None:
    """The exact value of a plain number (thousands commas, a leading ``\\$``, surrounding ``$``), else None."""
    s = normalize_latex(text).strip("$ ").replace("\\$", "").replace(" ", "").rstrip(".")
    if len(s) > _MAX_NUMBER_CHARS or not _NUMBER.fullmatch(s):
        return None
    return Fraction(s.replace(",", ""))


def _parse_gold(gold: str) -> list[Any]:
    from math_verify import parse
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    text = normalize_latex(gold)
    return parse(f"${text}$", extraction_config=configs, parsing_timeout=None) or parse(
        text, extraction_config=configs, parsing_timeout=None
    )


def _parse_answer(answer: str) -> list[Any]:
    from math_verify import parse
    from math_verify.parser import LatexExtractionConfig

    configs = [LatexExtractionConfig()]
    text = normalize_latex(answer)
    return parse(f"${text}$", extraction_config=configs, parsing_timeout=None) or parse(
        text, extraction_config=configs, parsing_timeout=None
    )


def math_equal(answer: str, gold: str) -> bool:
    """Whether ``answer`` (model text, LaTeX or plain) equals ``gold`` (trusted ground truth).

    Runs sympy on model text: call it only inside the verifier workers (``r1mega.rewards.pool``).
    """
    a, g = numeric_value(answer), numeric_value(gold)
    if a is not None and g is not None:
        return a == g
    from math_verify import verify

    parsed_gold, parsed_answer = _parse_gold(gold), _parse_answer(answer)
    if not parsed_gold or not parsed_answer:
        return False
    return bool(verify(parsed_gold, parsed_answer, timeout_seconds=None))


_warm = False
_WARM_UP = (
    ("\\frac{1}{2}", "0.5"),
    ("x = 3", "3"),
    ("\\{1, 2\\}", "\\{2, 1\\}"),
    ("2^{3}", "8"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("3.14159", "\\pi"),
    ("(2, 1)", "(1, 2)"),
)
"""Pairs whose first verification initialises slow lazy state (sympy's pi and intervals: ~1 s in all)."""


def warm_up() -> None:
    """Import math-verify and run it once (once per process), so that a worker's first verification is fast."""
    global _warm
    if _warm:
        return
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    for answer, gold in _WARM_UP:
        math_equal(answer, gold)
    _warm = True
