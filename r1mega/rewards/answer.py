"""Where the final answer is in a completion: the think block, the last ``\\boxed{}``, the text a verifier gets.

Everything here is plain string scanning in linear time with no recursion, so it is safe on hostile text
(a megabyte of output, braces nested 10^5 deep) and runs in the trainer process. Only the extracted final
answer, at most ``max_chars`` long, is ever sent to the verifier workers (``clip_to_answer``).

Extraction order, R1-style: the answer region is the text after ``</think>`` (a think block that was opened
but never closed has no answer); in it the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed 5`` wins;
without one, the last ``<answer>...</answer>`` (R1-Zero's template); without that, the last non-empty line
(tasks whose own format is a bare answer, such as countdown's expression). An unclosed last box command
means no answer (no fallback).
"""

from __future__ import annotations

import dataclasses
import re

from r1mega.rewards.registry import RewardInput

THINK_START = "<think>"
"""Opens the reasoning block (the same string as ``r1mega.data.tokenizer.THINK_START``)."""
THINK_END = "</think>"
"""Closes the reasoning block (the same string as ``r1mega.data.tokenizer.THINK_END``)."""
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
BOX_COMMANDS = ("\\boxed", "\\fbox")
"""LaTeX commands whose argument is a final answer."""
_TOKEN_END = " \t\r\n$"
_SPACES = re.compile(r"[ \t]*")
_MARKUP = 32
"""Characters of markup (``\\boxed{}``, ``<answer></answer>``) allowed around a clipped answer."""


def answer_region(completion: str, prefix_in_prompt: bool = False) -> str | None:
    """The text after the reasoning, where the final answer is; None when a think block was never closed.

    Without any think tags (and no forced prefix) the whole completion is the answer region.
    """
    end = completion.rfind(THINK_END)
    if end >= 0:
        return completion[end + len(THINK_END) :]
    if prefix_in_prompt or THINK_START in completion:
        return None
    return completion


def reasoning_text(completion: str, prefix_in_prompt: bool = False) -> str:
    """The reasoning: from ``<think>`` (the start when the prefix was in the prompt, or when there is no
    ``<think>``) to the first ``</think>`` (or the end)."""
    end = completion.find(THINK_END)
    body = completion if end < 0 else completion[:end]
    start = -1 if prefix_in_prompt else body.find(THINK_START)
    return body[start + len(THINK_START) :] if start >= 0 else body


def _last_opener(text: str) -> tuple[int, int] | None:
    """(start, end) of the last box command that is not the prefix of a longer command (``\\fboxsep``)."""
    best: tuple[int, int] | None = None
    for command in BOX_COMMANDS:
        i = text.rfind(command)
        while i >= 0:
            after = i + len(command)
            if after >= len(text) or not text[after].isalpha():
                if best is None or i > best[0]:
                    best = (i, after)
                break
            i = text.rfind(command, 0, i)
    return best


def _boxed_span(text: str, opener: tuple[int, int], max_content: int | None) -> tuple[int, int, int, int] | None:
    """Span of the boxed answer whose command is at ``opener``; None when unclosed or over ``max_content``."""
    start, n = opener[0], len(text)
    i = _SPACES.match(text, opener[1]).end()
    stop = n if max_content is None else min(n, i + 2 + max_content)
    if i < n and text[i] == "{":
        depth, j = 0, i
        while j < stop:
            c = text[j]
            if c == "\\":
                j += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return start, j + 1, i + 1, j
            j += 1
        return None
    j = i
    while j < stop and text[j] not in _TOKEN_END:
        j += 1
    if j == stop and stop < n:
        return None
    end = j
    while end > i and text[end - 1] in ".,;":
        end -= 1
    return (start, end, i, end) if end > i else None


def last_boxed_span(text: str, max_content: int | None = None) -> tuple[int, int, int, int] | None:
    """Span of the last boxed answer: (command start, end, content start, content end), or None.

    ``\\boxed{...}`` matches braces (``\\{`` and ``\\}`` are literal braces, not groups); ``\\boxed 5`` takes
    the next whitespace-free token. Only the last command counts, and when it is unclosed there is no answer
    (searching earlier ones could take quadratic time on hostile text). With ``max_content`` the scan stops
    after that many characters of content (a longer answer is no answer), so its cost is bounded too.
    """
    opener = _last_opener(text)
    return None if opener is None else _boxed_span(text, opener, max_content)


def _answer_span(region: str, max_content: int | None = None) -> tuple[int, int, int, int] | None:
    """(span start, span end, answer start, answer end) of the final answer in an answer region.

    A box command decides alone (an unclosed one means no answer); only without one do the ``<answer>`` tag
    and then the last line count.
    """
    opener = _last_opener(region)
    if opener is not None:
        return _boxed_span(region, opener, max_content)
    close = region.rfind(ANSWER_END)
    if close >= 0:
        open_ = region.rfind(ANSWER_START, 0, close)
        if open_ >= 0:
            return open_, close + len(ANSWER_END), open_ + len(ANSWER_START), close
    stripped = region.rstrip()
    line_start = max(stripped.rfind("\n"), stripped.rfind("\r")) + 1
    return line_start, len(stripped), line_start, len(stripped)


def extract_answer(completion: str, prefix_in_prompt: bool = False) -> str | None:
    """The final answer of a completion (see the module docstring), stripped; None when there is none."""
    region = answer_region(completion, prefix_in_prompt)
    if region is None:
        return None
    span = _answer_span(region)
    answer = region[span[2] : span[3]].strip() if span else ""
    return answer or None


def clip_to_answer(sample: RewardInput, max_chars: int) -> RewardInput:
    """The sample with its completion cut down to the final answer's own markup, as sent to a worker.

    ``extract_answer`` finds the same answer in the clipped completion as in the original. An answer longer
    than ``max_chars`` (or its markup longer than 32 characters), or one that contains think tags, is dropped
    (empty completion: reward 0). The cost is bounded by ``max_chars``, not by the completion's length.
    """
    region = answer_region(sample.completion, sample.prefix_in_prompt)
    clipped = ""
    if region is not None:
        span = _answer_span(region, max_chars)
        if span is not None and 0 < span[3] - span[2] <= max_chars and span[1] - span[0] <= max_chars + _MARKUP:
            clipped = region[span[0] : span[1]]
            if THINK_START in clipped or THINK_END in clipped:
                clipped = ""
    return dataclasses.replace(sample, completion=clipped, prefix_in_prompt=False)
