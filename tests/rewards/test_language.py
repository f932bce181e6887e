"""Language consistency: script detection by Unicode ranges and the share of reasoning words in the prompt's script."""

from __future__ import annotations

import time

import pytest

from r1mega.rewards.language import detect_script, language, script_share, word_scripts
from r1mega.rewards.registry import RewardError, RewardInput


@pytest.mark.parametrize(
    ("text", "script"),
    [
        ("Find the LCM of 50 and 26.", "latin"),
        ("Combien font 3 et 4 ? Réponds précisément.", "latin"),
        ("求 50 和 26 的最小公倍数。", "han"),
        ("50と26の最小公倍数を求めてください。", "japanese"),
        ("Найдите НОК чисел 50 и 26.", "cyrillic"),
        ("50과 26의 최소공배수를 구하세요.", "hangul"),
        ("Βρείτε το ΕΚΠ των 50 και 26.", "greek"),
        ("أوجد المضاعف المشترك الأصغر", "arabic"),
        ("12 + 7 = ?", None),
    ],
)
def test_detect_script(text: str, script: str | None) -> None:
    assert detect_script(text) == script


def test_words_ignore_variables_latex_and_numbers() -> None:
    assert word_scripts("Let x = \\frac{a}{b} + 12, so y is 3.") == {"latin": 3}  # Let, so, is
    assert word_scripts("我们 计算 x") == {"han": 4}  # one word per Han character


def _sample(prompt: str, reasoning: str, **kw: object) -> RewardInput:
    return RewardInput(prompt=prompt, completion=f"<think>\n{reasoning}\n</think>\n\\boxed{{1}}", **kw)


def test_language_reward() -> None:
    en = "What is 3 + 4?"
    assert language(_sample(en, "Three plus four makes seven.")) == 1.0
    assert language(_sample(en, "三加四等于七")) == 0.0
    # 4 Latin words ("First", "add", "the", "numbers") and 4 Han characters: half in the prompt's script.
    assert language(_sample(en, "First add the numbers 三加四等")) == pytest.approx(0.5)
    zh = "计算 3 加 4。"
    assert language(_sample(zh, "三加四等于七, 即 $3 + 4 = 7$ 所以 \\boxed{7}")) == 1.0
    ja = "3と4を足してください。"
    assert language(_sample(ja, "三と四を足すと七です。")) == 1.0
    assert language(_sample("12 + 7 = ?", "anything")) == 1.0  # the prompt's script cannot be told
    assert language(_sample(en, "3 + 4 = 7")) == 1.0  # no words, nothing mixed
    assert language(_sample(en, "三加四", metadata={"language": "han"})) == 1.0


def test_language_reward_with_forced_prefix_reads_only_the_reasoning() -> None:
    sample = RewardInput(
        prompt="What is 3 + 4?", completion="三加四\n</think>\nThe answer is seven.", prefix_in_prompt=True
    )
    assert language(sample) == 0.0


def test_unknown_script() -> None:
    with pytest.raises(RewardError, match="choose from"):
        script_share("text", "klingon")


def test_long_reasoning_is_cheap() -> None:
    text = "Let me compute the sum step by step, 我们 计算 这个 数字. " * 5000  # ~250k characters
    start = time.perf_counter()
    share = script_share(text, "latin")
    assert time.perf_counter() - start < 1.0
    assert share == pytest.approx(8 / 16)  # 8 English words, 8 Han characters per repeat
