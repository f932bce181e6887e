"""Prompt sets with verifiable answers for GRPO, rejection sampling and evaluation.

A prompt file is JSONL, one prompt per line, in either of two forms:

- ``{"id": ..., "task": ..., "prompt": ..., "answer": ...}`` (``eval_prompts.jsonl`` of the cold-start set);
- an SFT record ``{"id": ..., "prompt": ..., "meta": {"task": ..., "answer": ...}}`` (``train.jsonl``), whose
  reasoning and response are ignored.

Malformed lines fail with the file and line number. ``render_prompt`` applies the tokenizer's chat template
with a generation prompt (after ``grpo.system_prompt`` when set) and appends the forced prefix (R1's
``<think>\\n``).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from r1mega.data.jsonl import read_records


class PromptDataError(ValueError):
    """A prompt file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Prompt:
    """One prompt with the ground truth its answers are checked against."""

    id: str
    prompt: str
    answer: str
    task: str | None = None


def parse_prompt_record(record: Any, default_id: str) -> Prompt:
    """A :class:`Prompt` from one JSONL record (either form above); ``ValueError`` says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    prompt, answer = record.get("prompt", "record"), record.get("answer", meta.get("answer"))
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("'prompt' must be a non-empty string")
    if answer is None:
        raise ValueError("no 'answer' (or 'meta.answer') to verify responses against")
    task = record.get("task", meta.get("task"))
    return Prompt(str(record.get("id", default_id)), prompt, str(answer), None if task is None else str(task))


def load_prompts(path: str) -> list[Prompt]:
    """Every prompt in the JSONL file ``path`` (blank lines skipped; a malformed line names file and line)."""
    return read_records(path, parse_prompt_record, PromptDataError, "prompt", "record")[0]


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """The chat of one prompt: an optional system turn, then ``prompt`` as the user turn."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, prefix: str = "", system: str | None = None
) -> list[int]:
    """Token ids of ``prompt`` as a user turn (after ``system`` when given), the assistant's generation prompt,
    then ``prefix``."""
    text = tokenizer.apply_chat_template(chat_messages(prompt, system), tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text + prefix, add_special_tokens=False)


class PromptSampler:
    """Seeded, resumable order over a prompt set, split over data-parallel ranks (each epoch reshuffled)."""

    def __init__(self, size: int, seed: int, dp_rank: int = 0, dp_size: int = 1) -> None:
        self.size, self.seed, self.dp_rank, self.dp_size = size, seed, dp_rank, dp_size
        self.position = 0
        """Prompts handed out so far over all ranks."""

    @functools.lru_cache(maxsize=2)  # noqa: B019  (two epochs live at a time; the sampler lives all run)
    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        """The next ``count`` prompt indices of this rank (``count * dp_size`` are consumed globally)."""
        out = []
        for k in range(count * self.dp_size):
            epoch, i = divmod(self.position + k, self.size)
            if k % self.dp_size == self.dp_rank:
                out.append(self._order(epoch)[i])
        self.position += count * self.dp_size
        return out

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
