"""The rollout engine: batched, KV-cached sampling from an r1mega model for GRPO, rejection sampling,
distillation and evaluation.

Prompts of different lengths share one batch, left-padded so that every row writes the same cache slot
each step (RoPE positions stay per row). Rows that finish (end-of-sequence, a stop token or string, the
length limit) stop costing compute: once a quarter of the rows are done the batch and its cache are
compacted to the live rows.

Parallelism: every tensor-parallel rank runs the same prompts and gets the same tokens (sampled from the
gathered logits, then broadcast from the group's first rank). Under expert parallelism each rank brings its
own prompts (it is a data-parallel rank), and ranks keep stepping, on a dummy row once their own work is
done, until every rank has finished, because MoE layers exchange tokens in every step. Pipeline
parallelism is refused: generation needs the whole model on a rank.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from r1mega.checkpoint.weights import unwrap
from r1mega.rollout.decode import CachedDecoder, StepInputs
from r1mega.rollout.kv_cache import KVCache
from r1mega.rollout.sampling import SamplingParams, sample_tokens

FINISH_REASONS = ("eos", "stop", "length")


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


@contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


class RolloutEngine:
    """Samples completions from the model chunks a trainer holds (weights shared, never copied)."""

    def __init__(
        self,
        chunks: Sequence[torch.nn.Module],
        tokenizer: Any = None,
        eos_token_ids: Sequence[int] = (),
        vocab_size: int | None = None,
        seed: int = 0,
        pad_token_id: int = 0,
    ) -> None:
        if len(chunks) != 1:
            raise ValueError("the rollout engine needs one model chunk per rank (no virtual pipeline stages)")
        self.model: GPTModel = unwrap(chunks[0])
        self.tokenizer = tokenizer
        eos = list(eos_token_ids)
        if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = [tokenizer.eos_token_id]
        self.eos_token_ids = tuple(eos)
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id
        self.generator = torch.Generator().manual_seed(seed)
        self.stats = GenerationStats()
        self._decoder: CachedDecoder | None = None
        ep = parallel_state.get_expert_model_parallel_world_size()
        self._sync_group = parallel_state.get_expert_model_parallel_group() if ep > 1 else None

    # ---- state (for checkpointing the sampler) -----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The sampler's random state."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the sampler's random state."""
        self.generator.set_state(state["generator"])

    # ---- public API -----------------------------------------------------------------------------------

    def encode(self, prompts: Sequence[str], prefix: str = "") -> list[list[int]]:
        """Token ids of text prompts, each followed by ``prefix`` (R1: ``"<think>\\n"``)."""
        if self.tokenizer is None:
            raise ValueError("encode() needs the engine to be built with a tokenizer")
        return [self.tokenizer.encode(p + prefix, add_special_tokens=False) for p in prompts]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None) -> list[Completion]:
        """Sample one completion per prompt (token-id lists, chat template and prefix already applied)."""
        params = params or SamplingParams()
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine to be built with a tokenizer")
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        with _eval_mode(self.model):
            return self._generate([list(p) for p in prompts], params)

    # ---- internals ------------------------------------------------------------------------------------

    def _decoder_for(self, max_len: int) -> CachedDecoder:
        if self._decoder is None or self._decoder.max_len < max_len:
            self._decoder = CachedDecoder(self.model, max(max_len, 256))
        return self._decoder

    def _logits(self, decoder: CachedDecoder, ids: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        logits = decoder.step(ids, step, cache)
        if self.vocab_size is not None and self.vocab_size < logits.shape[-1]:
            logits[:, self.vocab_size :] = float("-inf")  # padded vocabulary entries are never sampled
        return logits

    def _sample(self, logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, logps = sample_tokens(logits, params, self.generator)
        if self._decoder is not None and self._decoder.tp > 1:
            group = self._decoder.tp_group
            src = torch.distributed.get_global_rank(group, 0)
            torch.distributed.broadcast(tokens, src=src, group=group)
            torch.distributed.broadcast(logps, src=src, group=group)
        return tokens, logps

    def _any_rank_active(self, active: bool) -> bool:
        if self._sync_group is None:
            return active
        flag = torch.tensor([int(active)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._sync_group)
        return bool(flag.item())

    def _stopped(self, row_tokens: list[int], params: SamplingParams) -> str | None:
        last = row_tokens[-1]
        if last in self.eos_token_ids and not params.ignore_eos:
            return "eos"
        if last in params.stop_token_ids:
            return "stop"
        if params.stop:
            tail = self.tokenizer.decode(row_tokens[-params.stop_check_tokens :], skip_special_tokens=False)
            if any(s in tail for s in params.stop):
                return "stop"
        return None

    def _text(self, tokens: list[int], reason: str, params: SamplingParams) -> str:
        if self.tokenizer is None:
            return ""
        ids = (
            tokens[:-1]
            if reason in ("eos", "stop") and tokens and tokens[-1] in (*self.eos_token_ids, *params.stop_token_ids)
            else tokens
        )
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        cuts = [text.find(s) for s in params.stop if s in text]
        return text[: min(cuts)] if cuts else text

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        t0 = time.perf_counter()
        n, lens = len(prompts), torch.tensor([len(p) for p in prompts])
        width = int(lens.max())
        max_len = width + params.max_new_tokens
        decoder = self._decoder_for(max_len)
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.model.config, len(decoder.layers), n, max_len, dtype, tp=decoder.tp)
        self.stats = GenerationStats(
            n, int(lens.sum()), cache_bytes=cache.nbytes, cache_bytes_per_token=cache.bytes_per_token()
        )

        pad = width - lens  # (n,) left padding
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
        slots = torch.arange(width)
        positions = (slots[None] - pad[:, None]).clamp(min=0)  # (n, width)
        key_valid = torch.zeros(n, max_len, dtype=torch.bool)
        key_valid[:, :width] = slots[None] >= pad[:, None]
        causal = slots[None, :] <= slots[:, None]  # (width, width)
        allowed = (causal[None] & key_valid[:, None, :width]) | torch.eye(width, dtype=torch.bool)[None]
        bias = torch.zeros(n, width, width).masked_fill(~allowed, float("-inf"))
        logits = self._logits(decoder, ids, StepInputs(0, positions, bias), cache)
        self.stats.prefill_s = time.perf_counter() - t0

        rows = torch.arange(n)  # original index of each cache row
        out_tokens: list[list[int]] = [[] for _ in range(n)]
        out_logps: list[list[float]] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        live = torch.ones(n, dtype=torch.bool)  # per cache row: still generating
        for t in itertools.count():
            tokens, logps = self._sample(logits, params)
            for r, (orig, tok, lp) in enumerate(zip(rows.tolist(), tokens.tolist(), logps.tolist(), strict=True)):
                if not live[r]:
                    continue
                out_tokens[orig].append(tok)
                out_logps[orig].append(lp)
                reason = self._stopped(out_tokens[orig], params)
                if reason is None and len(out_tokens[orig]) == params.max_new_tokens:
                    reason = "length"
                if reason is not None:
                    reasons[orig] = reason
                    live[r] = False
            self.stats.steps = t + 1
            if not self._any_rank_active(bool(live.any())):
                break
            if int(live.sum()) <= 0.75 * len(rows):  # drop finished rows (keep one as a dummy if none live)
                keep = live.nonzero().squeeze(1) if live.any() else torch.zeros(1, dtype=torch.long)
                cache.compact(keep)
                rows, live, tokens = rows[keep], live[keep], tokens[keep]
                key_valid, lens = key_valid[keep], lens[keep]
            # A rank with no live rows only serves other ranks' MoE exchanges; its dummy row reuses the last slot.
            slot = min(width + t, max_len - 1)
            key_valid[:, slot] = True
            step = StepInputs(
                slot,
                (lens + t).clamp(max=max_len - 1)[:, None],  # (b, 1) position of the new token
                torch.zeros(len(rows), 1, slot + 1).masked_fill(~key_valid[:, None, : slot + 1], float("-inf")),
            )
            logits = self._logits(decoder, tokens[:, None], step, cache)

        self.stats.decode_s = time.perf_counter() - t0 - self.stats.prefill_s
        self.stats.generated_tokens = sum(len(t) for t in out_tokens)
        return [
            Completion(p, toks, lps, self._text(toks, reason or "length", params), reason or "length")
            for p, toks, lps, reason in zip(prompts, out_tokens, out_logps, reasons, strict=True)
        ]
