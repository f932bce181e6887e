"""Final-answer extraction: think regions, the last boxed answer, fallbacks, clipping, hostile text in linear time."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from r1mega.rewards.answer import (
    THINK_END,
    THINK_START,
    answer_region,
    clip_to_answer,
    extract_answer,
    last_boxed_span,
    reasoning_text,
)
from r1mega.rewards.registry import RewardInput


def test_think_tags_match_the_tokenizer() -> None:
    # Read r1mega/data/tokenizer.py's constants without importing it (it imports transformers: seconds).
    source = Path(__file__).resolve().parents[2] / "r1mega" / "data" / "tokenizer.py"
    constants = {
        node.targets[0].id: node.value.value
        for node in ast.parse(source.read_text(encoding="utf-8")).body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
    }
    assert (THINK_START, THINK_END) == (constants["THINK_START"], constants["THINK_END"])


@pytest.mark.parametrize(
    ("completion", "prefix", "region"),
    [
        ("<think>\nr\n</think>\nA", False, "\nA"),
        ("r\n</think>\nA", True, "\nA"),
        ("<think>\nr\n</think>x</think>A", False, "A"),
        ("<think>\nnever closed \\boxed{1}", False, None),
        ("never closed \\boxed{1}", True, None),
        ("no tags \\boxed{1}", False, "no tags \\boxed{1}"),
    ],
)
def test_answer_region(completion: str, prefix: bool, region: str | None) -> None:
    assert answer_region(completion, prefix) == region


def test_reasoning_text() -> None:
    assert reasoning_text("<think>\nabc\n</think>\nA") == "\nabc\n"
    assert reasoning_text("abc\n</think>\nA", prefix_in_prompt=True) == "abc\n"
    assert reasoning_text("just text") == "just text"


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed {7}", "7"),
        ("\\boxed 5.", "5"),
        ("\\boxed 5$ and more", "5"),
        ("\\fbox{3}", "3"),
        ("\\boxed{1} \\fbox{9}", "9"),
        ("\\boxed{\\boxed{5}}", "5"),
        ("\\boxed{x} \\fboxsep", "x"),
        ("$\\boxed{x = 3}$", "x = 3"),
        ("\\boxed{a \\\\ b}", "a \\\\ b"),
    ],
)
def test_last_boxed(text: str, answer: str) -> None:
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text", ["\\boxed{1", "\\boxed{}", "\\boxed", "\\boxed{1} \\boxed{2", "\\boxed{1}\n\\boxed{"])
def test_no_boxed_answer(text: str) -> None:
    span = last_boxed_span(text)
    assert span is None or span[2] == span[3]
    assert extract_answer(text) is None


def test_box_limit() -> None:
    assert last_boxed_span("\\boxed{12345}", max_content=5) == (0, 13, 7, 12)
    assert last_boxed_span("\\boxed{123456}", max_content=5) is None
    assert last_boxed_span("\\fboxsep only") is None


def test_fallbacks_answer_tag_then_last_line() -> None:
    assert extract_answer("<think>r</think>\n<answer> 94*4 - 61 - 6 </answer>\n") == "94*4 - 61 - 6"
    assert extract_answer("<think>r</think>\nwork\n94*4 - 61 - 6\n\n") == "94*4 - 61 - 6"
    assert extract_answer("<think>r</think>\n   \n") is None
    assert extract_answer("<think>unfinished") is None


def test_hostile_text_is_scanned_in_linear_time() -> None:
    nested = "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}"
    unclosed = "\\boxed{" * 100_000
    big = "\\boxed{" + "9" * 1_000_000 + "}"
    many_commands = "\\fboxsep" * 100_000
    start = time.perf_counter()
    assert extract_answer(nested) == "{" * 100_000 + "1" + "}" * 100_000
    assert extract_answer(unclosed) is None  # an unclosed last box is no answer (no fallback)
    assert len(extract_answer(big) or "") == 1_000_000
    assert last_boxed_span(many_commands) is None
    assert time.perf_counter() - start < 2.0


def test_clip_cost_is_bounded_by_max_chars() -> None:
    hostile = [
        "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",
        "\\boxed{" + "9" * 1_000_000 + "}",
        "\\boxed" + " " * 1_000_000 + "{1}",
        "\\boxed " + "9" * 1_000_000,
        "x" * 1_000_000,
    ]
    start = time.perf_counter()
    for text in hostile:
        assert clip_to_answer(RewardInput(prompt="p", completion=text), max_chars=1000).completion == ""
    assert time.perf_counter() - start < 0.1 * len(hostile)


@pytest.mark.parametrize(
    "completion",
    [
        "<think>r</think> The answer is \\boxed{\\frac{1}{2}}, done.",
        "<think>r</think> \\boxed 5",
        "<think>r</think>\n<answer>3 + 4</answer>",
        "<think>r</think>\nfirst\nlast line 7",
        "no think \\fbox{x=3}",
    ],
)
def test_clip_keeps_the_answer(completion: str) -> None:
    sample = RewardInput(prompt="p", completion=completion)
    clipped = clip_to_answer(sample, max_chars=100)
    assert clipped.prefix_in_prompt is False
    assert len(clipped.completion) <= len(completion)
    assert extract_answer(clipped.completion) == extract_answer(completion)


def test_clip_with_forced_prefix() -> None:
    sample = RewardInput(prompt="p", completion="reasoning\n</think>\n\\boxed{4}", prefix_in_prompt=True)
    assert clip_to_answer(sample, 100).completion == "\\boxed{4}"


@pytest.mark.parametrize(
    ("completion", "clipped"),
    [
        ("<think>r</think>\\boxed{" + "9" * 2000 + "}", ""),
        ("<think>r</think>\\boxed{" + "9" * 2000 + " \\boxed{5}}", "\\boxed{5}"),  # the last boxed wins
        ("<think>r</think>" + "9" * 2000, ""),
        ("<think>unfinished \\boxed{5}", ""),
        ("<think>r</think>\\boxed{<think>5}", ""),
    ],
    ids=["long-boxed", "nested-last", "long-line", "unclosed-think", "think-in-answer"],
)
def test_clip_drops_long_or_missing_answers(completion: str, clipped: str) -> None:
    assert clip_to_answer(RewardInput(prompt="p", completion=completion), max_chars=1000).completion == clipped
