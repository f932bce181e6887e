"""R1's format reward: exactly one ``<think>...</think>`` block first, then a non-empty answer."""

from __future__ import annotations

from r1mega.rewards.answer import THINK_END, THINK_START
from r1mega.rewards.registry import RewardInput, register_reward


def think_format_ok(completion: str, prefix_in_prompt: bool = False) -> bool:
    """Whether the response is ``<think>reasoning</think>answer`` with one think block and a non-empty answer.

    With ``prefix_in_prompt`` the forced ``<think>`` was in the prompt, so the completion starts inside the
    block and must not open another one. Whitespace before ``<think>`` is allowed; other text is not.
    """
    text = (THINK_START + completion) if prefix_in_prompt else completion.lstrip()
    if not text.startswith(THINK_START) or text.count(THINK_START) != 1 or text.count(THINK_END) != 1:
        return False
    return bool(text.split(THINK_END, 1)[1].strip())


@register_reward("format")
def format_reward(sample: RewardInput) -> float:
    """1.0 when ``think_format_ok``, else 0.0."""
    return 1.0 if think_format_ok(sample.completion, sample.prefix_in_prompt) else 0.0
