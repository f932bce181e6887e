"""R1's format reward, with and without the forced ``<think>`` prefix in the prompt."""

from __future__ import annotations

import pytest

from r1mega.rewards.formatting import format_reward, think_format_ok
from r1mega.rewards.registry import RewardInput


@pytest.mark.parametrize(
    ("completion", "prefix", "ok"),
    [
        ("<think>\nreasoning\n</think>\n\nThe answer is \\boxed{3}.", False, True),
        ("  \n<think>r</think>A", False, True),
        ("<think></think>A", False, True),
        ("reasoning\n</think>\n\\boxed{3}", True, True),
        ("\nreasoning\n</think>\nA", True, True),
        ("<think>\nreasoning\n</think>\n\\boxed{3}", True, False),  # a second <think> after the forced one
        ("reasoning\n</think>\n\\boxed{3}", False, False),  # no opening tag and no forced prefix
        ("<think>\nreasoning\n</think>\n   \n", False, False),  # empty answer
        ("<think>\nreasoning never closed", False, False),
        ("reasoning never closed", True, False),
        ("<think>a</think><think>b</think>A", False, False),
        ("<think>a</think>A</think>B", False, False),
        ("Sure! <think>a</think>A", False, False),
        ("The answer is 3.", False, False),
        ("", False, False),
        ("", True, False),
    ],
)
def test_think_format(completion: str, prefix: bool, ok: bool) -> None:
    assert think_format_ok(completion, prefix) is ok
    assert format_reward(RewardInput(prompt="q", completion=completion, prefix_in_prompt=prefix)) == float(ok)
