"""Sampling settings and the per-step token sampler (temperature, top-k, top-p) of the rollout engine.

The log-probability returned for each sampled token is taken under ``log_softmax(logits / T)`` (``T = 1``
for greedy decoding), before top-k/top-p truncation: the same quantity a training forward computes from
the same logits divided by the same temperature, which is what GRPO's importance ratio needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """How to sample one batch of completions. Defaults are DeepSeek-R1's recommendation."""

    temperature: float = 0.6
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 0.95
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (1 = off)."""
    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens (0 = off)."""
    max_new_tokens: int = 256
    """Completion length limit in tokens (the forced prefix is part of the prompt and not counted)."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends once the completion text contains one; the text is cut before it."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a completion besides the tokenizer's end-of-sequence token."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence (benchmarks with a fixed length)."""
    seed: int | None = None
    """Reseed the engine's sampler for this call (None continues its current random stream)."""
    logprobs: bool = True
    """Return the log-probability of every sampled token."""
    stop_check_tokens: int = field(default=16, repr=False)
    """How many trailing tokens are decoded per step to look for stop strings (at least the longest stop)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 is off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids)
        if self.stop:
            self.stop_check_tokens = max(self.stop_check_tokens, max(len(s) for s in self.stop) + 2)

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax."""
        return self.temperature == 0


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits outside the top-k / nucleus to -inf. ``logits``: (b, V), already divided by T.

    Top-p keeps token i (tokens sorted by probability, descending) while the probability mass before it
    is below ``top_p``; the most likely token is always kept (Hugging Face's ``TopPLogitsWarper``).
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (b, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
        remove = before >= top_p
        remove[:, 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def sample_tokens(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One token per row and its log-probability. ``logits``: (b, V) fp32 -> ((b,) int64, (b,) fp32)."""
    if params.greedy:
        tokens = logits.argmax(dim=-1)  # (b,)
        logp = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits / params.temperature
        logp = torch.log_softmax(scaled, dim=-1)  # (b, V)
        probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
