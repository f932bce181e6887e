"""R1's evaluation summary against hand-computed values: pass@1 averaged per prompt, cons@k with its
first-seen tie-break, per-task accuracy, format rate and mean length."""

from __future__ import annotations

import pytest

from r1mega.eval.protocol import SampleResult, summarize


def _samples(prompt: str, task: str | None, answers: list, correct: list[bool], formatted=None, lengths=None):
    formatted = formatted or [True] * len(answers)
    lengths = lengths or [10] * len(answers)
    return [
        SampleResult(prompt, task, f"text {a}", a, c, f, n)
        for a, c, f, n in zip(answers, correct, formatted, lengths, strict=True)
    ]


RESULTS = [
    # A: 1 of 4 right; the majority answer "2" is wrong -> cons 0
    *_samples("A", "t1", ["1", "2", "2", "3"], [True, False, False, False], lengths=[4, 8, 12, 16]),
    # B: 2 of 4 right; "5" and "7" tie 2-2, "5" is seen first and wrong -> cons 0
    *_samples("B", "t1", ["5", "7", "5", "7"], [False, True, False, True], formatted=[True, True, False, False]),
    # C: no answer in two samples (they do not vote); "9" wins and is right -> cons 1
    *_samples("C", "t2", [None, "9", None, "9"], [False, True, False, True], formatted=[False, True, False, True]),
    # D: no answer at all -> pass 0, cons 0
    *_samples("D", "t2", [None, None, None, None], [False] * 4, formatted=[False] * 4),
]


def test_summarize_matches_hand_computed_values() -> None:
    m = summarize(RESULTS)
    assert m["pass@1"] == pytest.approx((0.25 + 0.5 + 0.5 + 0.0) / 4)
    assert m["cons@k"] == pytest.approx(1 / 4)
    assert m["accuracy/t1"] == pytest.approx((0.25 + 0.5) / 2)
    assert m["accuracy/t2"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["format_rate"] == pytest.approx((4 + 2 + 2 + 0) / 16)
    assert m["response_length"] == pytest.approx((4 + 8 + 12 + 16 + 12 * 10) / 16)
    assert m["prompts"] == 4


def test_cons_tie_break_is_the_first_answer_seen() -> None:
    right_first = _samples("B", "t", ["7", "5", "7", "5"], [True, False, True, False])
    assert summarize(right_first)["cons@k"] == 1.0
    wrong_first = _samples("B", "t", ["5", "7", "5", "7"], [False, True, False, True])
    assert summarize(wrong_first)["cons@k"] == 0.0


def test_pass1_weights_prompts_equally_and_tasks_default_to_unknown() -> None:
    """A prompt with more samples does not count more: pass@1 is a mean of per-prompt means."""
    results = _samples("A", None, ["1"] * 2, [True, True]) + _samples("B", None, ["2"] * 6, [False] * 6)
    m = summarize(results)
    assert m["pass@1"] == pytest.approx(0.5)
    assert m["accuracy/unknown"] == pytest.approx(0.5)
    assert summarize([]) == {}
