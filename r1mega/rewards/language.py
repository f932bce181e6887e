"""R1's language-consistency reward: the share of reasoning words written in the prompt's script.

DeepSeek-R1 adds "the proportion of target language words in the CoT" to fight language mixing. This is a
cheap stand-in with no model and no download: a word's language is its Unicode *script* (Latin, Cyrillic,
Han, ...), so English and French are not told apart, but Chinese drifting into an English chain of thought
(R1's actual failure) is caught.

Words: runs of letters of one script; Latin, Greek and Cyrillic runs of one letter (variables such as
``x``) do not count, nor do LaTeX command names (``\\frac``), digits or symbols. Han and kana have no
spaces, so each character counts as one word. A prompt with kana is Japanese and accepts Han and kana.
Cost: a few regex scans over the reasoning, about 1 ms per 10k characters.
"""

from __future__ import annotations

import re
from collections import Counter

from r1mega.rewards.answer import reasoning_text
from r1mega.rewards.registry import RewardError, RewardInput, register_reward

_RANGES: dict[str, str] = {
    "latin": "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff",
    "greek": "\u0370-\u03ff\u1f00-\u1fff",
    "cyrillic": "\u0400-\u052f",
    "armenian": "\u0530-\u058f",
    "hebrew": "\u0590-\u05ff",
    "arabic": "\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff",
    "devanagari": "\u0900-\u097f",
    "bengali": "\u0980-\u09ff",
    "thai": "\u0e00-\u0e7f",
    "georgian": "\u10a0-\u10ff",
    "hangul": "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af",
    "kana": "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f",
    "han": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef",
}
_PER_CHARACTER = ("han", "kana")
_MIN_RUN = {"latin": 2, "greek": 2, "cyrillic": 2}
_WORDS = {
    script: re.compile(f"[{chars}]" if script in _PER_CHARACTER else f"[{chars}]{{{_MIN_RUN.get(script, 1)},}}")
    for script, chars in _RANGES.items()
}
_ANY_LETTER = {script: re.compile(f"[{chars}]") for script, chars in _RANGES.items()}
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")

SCRIPTS = (*_RANGES, "japanese")
"""Script names a prompt can be in ("japanese": kana with or without Han)."""
_ACCEPTS = {script: (script,) for script in _RANGES} | {"japanese": ("kana", "han")}


def word_scripts(text: str) -> Counter[str]:
    """Number of words per script in ``text`` (see the module docstring for what a word is)."""
    text = _LATEX_COMMAND.sub(" ", text)
    if text.isascii():
        return +Counter({"latin": len(_WORDS["latin"].findall(text))})
    present = "".join(set(text))
    counts: Counter[str] = Counter()
    for script, pattern in _WORDS.items():
        if _ANY_LETTER[script].search(present):
            counts[script] = len(pattern.findall(text))
    return +counts


def detect_script(text: str) -> str | None:
    """The script most words of ``text`` are in ("japanese" when it has kana); None without words."""
    counts = word_scripts(text)
    if not counts:
        return None
    if counts["kana"]:
        counts["japanese"] = counts.pop("kana") + counts.pop("han", 0)
    return counts.most_common(1)[0][0]


def script_share(text: str, script: str) -> float:
    """Share of the words of ``text`` written in ``script`` (1.0 when ``text`` has no words)."""
    if script not in _ACCEPTS:
        raise RewardError(f"Unknown script {script!r}: choose from {', '.join(SCRIPTS)}.")
    counts = word_scripts(text)
    total = sum(counts.values())
    if total == 0:
        return 1.0
    return sum(counts[s] for s in _ACCEPTS[script]) / total


@register_reward("language")
def language(sample: RewardInput) -> float:
    """Share of the reasoning's words in the prompt's script (``metadata["language"]`` overrides it).

    1.0 when the prompt's script cannot be told or the reasoning has no words (nothing is mixed).
    """
    target = sample.metadata["language"] if "language" in sample.metadata else detect_script(sample.prompt)
    if target is None:
        return 1.0
    return script_share(reasoning_text(sample.completion, sample.prefix_in_prompt), target)
