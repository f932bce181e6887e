"""Length shaping: DAPO's soft overlong penalty and Kimi-1.5's group length reward.

DAPO (Yu et al. 2025, eq. 13), with L = completion tokens, L_max the length limit, L_cache the buffer::

    R = 0                                if L <= L_max - L_cache
    R = ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max   (0 down to -1)
    R = -1                               if L > L_max

Kimi-1.5 (Kimi Team 2025, sec. 2.3.3), within one group of responses to the same prompt, with
lambda_i = 0.5 - (L_i - L_min) / (L_max - L_min) (0 when all lengths are equal)::

    R_i = lambda_i            if response i is correct
    R_i = min(0, lambda_i)    otherwise

so the shortest correct answer gets +0.5, the longest -0.5, and wrong answers are never rewarded for
being short.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from r1mega.rewards.registry import RewardError, RewardInput, register_reward


def dapo_overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment in [-1, 0] (formula in the module docstring).

    A buffer larger than ``max_length`` is clipped to it (the penalty then starts at length 0).
    """
    if max_length <= 0 or buffer <= 0:
        raise RewardError(f"Overlong penalty needs max_length > 0 and buffer > 0, got {max_length} and {buffer}.")
    buffer = min(buffer, max_length)
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length > max_length:
        return -1.0
    return (start - length) / buffer


@register_reward("overlong", options=("overlong_buffer_tokens", "overlong_max_tokens"))
def overlong(
    sample: RewardInput, *, overlong_buffer_tokens: int = 4096, overlong_max_tokens: int | None = None
) -> float:
    """DAPO's soft overlong penalty of ``sample.completion_tokens``; L_max is ``overlong_max_tokens`` or
    else the sample's ``max_tokens``, L_cache is ``overlong_buffer_tokens``."""
    max_length = overlong_max_tokens if overlong_max_tokens is not None else sample.max_tokens
    if max_length <= 0:
        raise RewardError(
            "The overlong reward needs RewardInput.max_tokens (the rollout's token limit) or reward.overlong_max_tokens."
        )
    return dapo_overlong_penalty(sample.completion_tokens, max_length, overlong_buffer_tokens)


def kimi_length_rewards(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """Kimi-1.5's length reward of each response in one group (formula in the module docstring)."""
    if len(lengths) != len(correct):
        raise RewardError(f"Got {len(lengths)} lengths for {len(correct)} correctness flags: give one per response.")
    if not lengths:
        return []
    shortest, longest = min(lengths), max(lengths)
    if longest == shortest:
        return [0.0] * len(lengths)
    lam = [0.5 - (n - shortest) / (longest - shortest) for n in lengths]
    return [v if ok else min(0.0, v) for v, ok in zip(lam, correct, strict=True)]


@register_reward("length", group=True, requires=("accuracy",))
def length(samples: Sequence[RewardInput], values: Sequence[Mapping[str, float]]) -> list[float]:
    """Kimi-1.5's length reward over one GRPO group; correct means ``accuracy`` >= 0.5."""
    return kimi_length_rewards([s.completion_tokens for s in samples], [v["accuracy"] >= 0.5 for v in values])
