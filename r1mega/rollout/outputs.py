"""What a rollout call returns: the sampled completions and the call's timing and size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from r1mega.rollout.sampling import SamplingParams


@dataclass
class Completion:
    """One sampled completion."""

    prompt_ids: list[int]
    token_ids: list[int]
    """Generated tokens, including a final end-of-sequence or stop token."""
    logprobs: list[float]
    """log p(token) under ``log_softmax(logits / T)`` per generated token (see ``sampling``)."""
    text: str
    """Decoded completion, without a final end-of-sequence token and cut before a stop string."""
    finish_reason: str
    """``eos``, ``stop`` (a stop token or string) or ``length``."""


@dataclass
class GenerationStats:
    """Timing and size of the last ``generate`` call on this rank."""

    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    cache_bytes: int = 0
    cache_bytes_per_token: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time (prefill included)."""
        return self.generated_tokens / max(self.prefill_s + self.decode_s, 1e-9)


@dataclass
class RowOutputs:
    """What a ``generate`` call has sampled so far, per prompt (in the call's order)."""

    params: SamplingParams
    tokens: list[list[int]]
    logps: list[list[float]]
    reasons: list[str | None]
    """Why each prompt's completion ended (None while it runs)."""

    @classmethod
    def of(cls, n: int, params: SamplingParams) -> RowOutputs:
        return cls(params, [[] for _ in range(n)], [[] for _ in range(n)], [None] * n)


def finish_reason(
    tokens: list[int], params: SamplingParams, eos_token_ids: tuple[int, ...], tokenizer: Any
) -> str | None:
    """Why a completion whose last token is ``tokens[-1]`` ends there (``eos``, ``stop``), or None if it goes on.
    Stop strings are looked for in the decoded last ``params.stop_check_tokens`` tokens."""
    last = tokens[-1]
    if last in eos_token_ids and not params.ignore_eos:
        return "eos"
    if last in params.stop_token_ids:
        return "stop"
    if params.stop:
        tail = tokenizer.decode(tokens[-params.stop_check_tokens :], skip_special_tokens=False)
        if any(s in tail for s in params.stop):
            return "stop"
    return None


def completion_text(
    tokens: list[int], reason: str, params: SamplingParams, eos_token_ids: tuple[int, ...], tokenizer: Any
) -> str:
    """The decoded completion: without a final end-of-sequence or stop token, cut before a stop string ("" without
    a tokenizer)."""
    if tokenizer is None:
        return ""
    ends = reason in ("eos", "stop") and tokens and tokens[-1] in (*eos_token_ids, *params.stop_token_ids)
    text = tokenizer.decode(tokens[:-1] if ends else tokens, skip_special_tokens=False)
    cuts = [text.find(s) for s in params.stop if s in text]
    return text[: min(cuts)] if cuts else text
