"""The rollout engine's per-row decode loop: continuous batching, per-sequence seeds, MTP speculative decoding.

The engine's default loop runs one batch of prompts in lockstep and draws every row from one generator. This
loop keeps state per cache row instead, which buys three things:

- **Continuous batching** (``max_batch``): at most ``max_batch`` rows decode at once. When rows finish, waiting
  prompts are prefilled (together, in one forward) into the freed cache rows, so the batch stays full until
  the work runs out; after that, finished rows are dropped as in the default loop. Prompts wait shortest
  first, so those prefilled together have similar lengths (little padding).
- **Per-sequence seeds**: every random draw of a sequence comes from a hash of (its seed, the token's index,
  the draw's purpose) (``sampling.row_uniforms``), so a sequence's tokens do not depend on which sequences
  share its batch or when it entered: generated alone with the same seed, it gives the same tokens.
- **MTP speculative decoding** (``speculative``): the model's own multi-token-prediction module (DeepSeek-V3)
  drafts the token after next from the main model's hidden state and the token just sampled. The next step
  feeds ``[last token, draft]`` through the main model in one forward and keeps the draft by the
  speculative-sampling rule (``sampling.speculative_accept``), so tokens are distributed exactly as without
  drafting; when it is kept, the drafted position's logits give a second token. The MTP layer has its own
  cache (layer ``num_layers`` of the cache), filled for every committed position. Log-probabilities are the
  main model's, as in the default loop.

Layout: a prompt is prefilled left-padded in its group of width ``w``, so its tokens sit at cache slots
``[pad, w)`` and generated tokens follow; RoPE position = slot - pad. Each row has its own slot, and each
step's attention bias is built from (pad, slot) per row: a query sees slots ``[pad, its own slot]``.

Parallelism: tensor-parallel ranks run the same schedule (same prompts, seeds and gathered logits; tokens are
broadcast from the group's first rank as in the default loop). Under expert parallelism each rank brings its
own prompts; every iteration ranks agree (one all-reduce) whether any still works and whether any prefills,
and a rank with nothing to prefill runs a throw-away one-token prefill, because MoE layers exchange tokens in
every forward. Speculative decoding runs on one process (the engine refuses it otherwise).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from r1mega.rollout.decode import CachedDecoder, StepInputs
from r1mega.rollout.kv_cache import KVCache
from r1mega.rollout.outputs import Completion, GenerationStats
from r1mega.rollout.sampling import (
    STREAM_ACCEPT,
    STREAM_DRAFT,
    STREAM_RESIDUAL,
    SamplingParams,
    inverse_cdf,
    logprob_of,
    row_uniforms,
    sample_rows,
    sampling_probs,
    speculative_accept,
)

REFILL_SHARE = 8
"""Waiting prompts are prefilled once at least 1/8 of the rows (and at least one) are free, so that
refills come in groups (one forward each) rather than one prompt per step."""


def generate_rows(
    engine: Any, prompts: list[list[int]], params: SamplingParams, seeds: Sequence[int] | None
) -> list[Completion]:
    """One ``generate`` call of ``engine`` (a ``RolloutEngine``) through the per-row loop; without ``seeds`` each
    sequence's seed is drawn from the engine's generator."""
    if seeds is None:
        drawn = torch.randint(0, 2**62, (len(prompts),), generator=engine.generator, device=engine.device)
        seeds = drawn.tolist()
    engine.stats = GenerationStats(len(prompts), sum(map(len, prompts)), extra={"cuda_graphs": False})
    rows = RowScheduler(engine, prompts, params, list(seeds), engine.max_batch, engine.speculative)
    engine.stats.cache_bytes = rows.cache.nbytes
    engine.stats.cache_bytes_per_token = rows.cache.bytes_per_token()
    tokens, logps, reasons = rows.run()
    engine.stats.generated_tokens = sum(map(len, tokens))
    return [
        Completion(p, t, lp, engine._text(t, reason, params), reason)
        for p, t, lp, reason in zip(prompts, tokens, logps, reasons, strict=True)
    ]


@dataclass
class _Seq:
    """A sequence being generated in a cache row."""

    index: int
    """Its prompt's index in the call."""
    tokens: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)


class RowScheduler:
    """One ``generate`` call of the per-row loop; ``run`` returns tokens, log-probabilities and finish
    reasons per prompt."""

    def __init__(
        self,
        engine: Any,  # the RolloutEngine that owns this call (not imported: the engine imports this module)
        prompts: list[list[int]],
        params: SamplingParams,
        seeds: list[int],
        max_batch: int | None,
        speculative: bool,
    ) -> None:
        self.engine, self.prompts, self.params, self.spec = engine, prompts, params, speculative
        self.device = engine.device
        n = len(prompts)
        size = min(max_batch or n, n)
        self.max_len = max(len(p) for p in prompts) + params.max_new_tokens + 1  # +1: a finished row's slot
        self.decoder: CachedDecoder = engine._decoder_for(self.max_len)
        self.layers = len(self.decoder.layers) + int(speculative)  # the MTP layer's cache comes last
        self.dtype = next(engine.model.parameters()).dtype
        self.cache = self._new_cache(size, self.max_len)
        # Popped from the end: the shortest prompts enter first, and prompts of similar length enter together. A
        # refill's forward is left-padded to its longest prompt, so groups of mixed lengths (16-48 tokens in the
        # bench) computed up to 1.5x their tokens. Per-sequence seeds keep each sequence's tokens independent of
        # when it enters.
        self.waiting = sorted(range(n), key=lambda i: len(prompts[i]), reverse=True)
        self.seeds = seeds
        self.rows: list[_Seq | None] = [None] * size  # None: a free (or finished) row
        self.pad = [0] * size
        self.slot = [0] * size  # cache slot of each row's last sampled token, fed in the next step
        zeros = torch.zeros(size, dtype=torch.long, device=self.device)
        self.tokens, self.seed_t, self.draft = zeros, zeros.clone(), zeros.clone()
        self.q: Tensor | None = None  # (size, V) draft distributions (speculative)
        self.out_tokens: list[list[int]] = [[] for _ in range(n)]
        self.out_logps: list[list[float]] = [[] for _ in range(n)]
        self.reasons = ["length"] * n
        self.drafted = self.accepted = self.prefills = 0

    # ---- the loop ---------------------------------------------------------------------------------------

    def run(self) -> tuple[list[list[int]], list[list[float]], list[str]]:
        """Decode until every prompt is done (on every expert-parallel rank)."""
        stats, steps = self.engine.stats, 0
        while True:
            free = [r for r, seq in enumerate(self.rows) if seq is None]
            live = len(self.rows) - len(free)
            refill = self.waiting and free and (len(free) * REFILL_SHARE >= len(self.rows) or live == 0)
            busy, prefilling = self._agree(bool(self.waiting) or live > 0, bool(refill))
            if not busy:
                break
            t0 = time.perf_counter()
            if refill:
                self._prefill(free[: len(self.waiting)])
            elif prefilling:
                self._dummy_prefill()
            t1 = time.perf_counter()
            self._spec_step() if self.spec else self._plain_step()
            self._compact()
            stats.prefill_s += t1 - t0
            stats.decode_s += time.perf_counter() - t1
            steps += 1
        stats.steps = steps
        stats.extra.update(continuous=True, rows=len(self.seeds), prefills=self.prefills)
        if self.spec:
            rate = self.accepted / max(self.drafted, 1)
            stats.extra.update(drafted=self.drafted, accepted=self.accepted, acceptance_rate=rate)
        return self.out_tokens, self.out_logps, self.reasons

    def _agree(self, busy: bool, prefilling: bool) -> tuple[bool, bool]:
        """(any rank busy, any rank prefilling) over the expert-parallel group."""
        group = self.engine._sync_group
        if group is None:
            return busy, prefilling
        flags = torch.tensor([int(busy), int(prefilling)], device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group)
        a, b = flags.tolist()
        return bool(a), bool(b)

    # ---- prefill ----------------------------------------------------------------------------------------

    def _new_cache(self, rows: int, length: int) -> KVCache:
        cfg, tp = self.engine.model.config, self.decoder.tp
        return KVCache(cfg, self.layers, rows, length, self.dtype, self.device, tp=tp)

    def _prefill(self, rows: list[int]) -> None:
        """Prefill the next waiting prompts into the free cache ``rows`` (one left-padded forward), sample their
        first tokens and, when speculative, their first drafts."""
        new = [self.waiting.pop() for _ in rows]
        prompts = [self.prompts[i] for i in new]
        k, w = len(new), max(len(p) for p in prompts)
        ids = torch.full((k, w), self.engine.pad_token_id, dtype=torch.long)  # built on the host, copied once
        for i, p in enumerate(prompts):
            ids[i, w - len(p) :] = torch.tensor(p)
        ids = self.engine._to_device(ids)
        pads = torch.tensor([w - len(p) for p in prompts], device=self.device)  # (k,)
        slots = torch.arange(w, device=self.device)
        valid = slots[None] >= pads[:, None]  # (k, w)
        allowed = (slots[None, :] <= slots[:, None])[None] & valid[:, None, :]  # (k, w, w) causal, no padding
        allowed |= torch.eye(w, dtype=torch.bool, device=self.device)[None]  # padding queries see themselves
        bias = torch.zeros(k, w, w, device=self.device).masked_fill(~allowed, float("-inf"))
        step = StepInputs(0, (slots[None] - pads[:, None]).clamp(min=0), bias)
        tmp = self._new_cache(k, w)
        seeds = torch.tensor([self.seeds[i] for i in new], device=self.device)  # (k,)
        counters = torch.zeros(k, dtype=torch.long, device=self.device)
        if self.spec:
            hidden = self.decoder.hidden(ids, step, tmp)  # (w, k, h)
            first, logps = self._draw(self._logits(hidden[-1:])[:, 0], seeds, counters)
            next_ids = torch.cat([ids[:, 1:], first[:, None]], dim=1)  # (k, w): the token after each position
            mtp = self.decoder.mtp_hidden(hidden, next_ids, step, tmp)[-1:]  # (1, k, h)
            q, draft = self._draft(self._logits(mtp)[:, 0], seeds, counters + 1)
        else:
            first, logps = self._draw(self._mask(self.decoder.step(ids, step, tmp)), seeds, counters)
        idx = torch.tensor(rows, device=self.device)
        self.cache.put_rows(idx, tmp)
        self.tokens[idx], self.seed_t[idx] = first, seeds
        if self.spec:
            self.draft[idx] = draft
            self.q = q.new_zeros(len(self.rows), q.shape[-1]) if self.q is None else self.q
            self.q[idx] = q
        self.prefills += 1
        host_tokens, host_logps = self.engine._to_host(first, logps)
        for r, i, p, tok, lp in zip(rows, new, prompts, host_tokens, host_logps, strict=True):
            self.rows[r], self.pad[r], self.slot[r] = _Seq(i), w - len(p), w
            self._commit(r, tok, lp)

    def _dummy_prefill(self) -> None:
        """A one-token forward into a scratch cache: this rank's share of another rank's prefill (MoE)."""
        ids = torch.full((1, 1), self.engine.pad_token_id, dtype=torch.long, device=self.device)
        zero = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.decoder.step(ids, StepInputs(0, zero, torch.zeros(1, 1, 1, device=self.device)), self._new_cache(1, 1))

    # ---- decode steps -----------------------------------------------------------------------------------

    def _inputs(self, s: int) -> StepInputs:
        """Step inputs for ``s`` new tokens per row at each row's slots."""
        slots = torch.tensor(self.slot, device=self.device)[:, None] + torch.arange(s, device=self.device)  # (b, s)
        pads = torch.tensor(self.pad, device=self.device)[:, None, None]  # (b, 1, 1)
        keys = torch.arange(max(self.slot) + s, device=self.device)  # (S,)
        visible = (keys >= pads) & (keys <= slots[:, :, None])  # (b, s, S)
        bias = torch.zeros(visible.shape, device=self.device).masked_fill_(~visible, float("-inf"))
        return StepInputs(0, slots - pads[:, :, 0], bias, row_slots=slots)

    def _counters(self) -> Tensor:
        """(b,) index of the next token of each row's sequence."""
        return torch.tensor([len(s.tokens) if s else 0 for s in self.rows], device=self.device)

    def _plain_step(self) -> None:
        logits = self._mask(self.decoder.step(self.tokens[:, None], self._inputs(1), self.cache))  # (b, V)
        tokens, logps = self._draw(logits, self.seed_t, self._counters())
        self.tokens = tokens
        host_tokens, host_logps = self.engine._to_host(tokens, logps)
        for r, (tok, lp) in enumerate(zip(host_tokens, host_logps, strict=True)):
            if self.rows[r] is not None:
                self.slot[r] += 1
                self._commit(r, tok, lp)

    def _spec_step(self) -> None:
        """Verify each row's draft and take one or two tokens; draft the next one with the MTP module."""
        step = self._inputs(2)
        hidden = self.decoder.hidden(torch.stack([self.tokens, self.draft], dim=1), step, self.cache)  # (2, b, h)
        logits = self._logits(hidden)  # (b, 2, V)
        c = self._counters()
        p = sampling_probs(logits[:, 0], self.params)  # (b, V)
        u_accept, u_residual = (
            row_uniforms(self.seed_t, c, STREAM_ACCEPT),
            row_uniforms(self.seed_t, c, STREAM_RESIDUAL),
        )
        accepted, first = speculative_accept(p, self.q, self.draft, u_accept, u_residual)  # (b,), (b,)
        second, logp2 = self._draw(logits[:, 1], self.seed_t, c + 1)  # (b,) taken only if accepted
        logp1 = logprob_of(logits[:, 0], first, self.params)
        mtp = self.decoder.mtp_hidden(hidden, torch.stack([first, second], dim=1), step, self.cache)  # (2, b, h)
        rows = torch.arange(len(self.rows), device=self.device)
        last = mtp[accepted.long(), rows][None]  # (1, b, h): the MTP output at the last committed position
        self.q, self.draft = self._draft(self._logits(last)[:, 0], self.seed_t, c + 1 + accepted.long())
        self.tokens = torch.where(accepted, second, first)
        both = torch.stack([first, second, accepted.long()]).double()  # (3, b)
        host = torch.cat([both, torch.stack([logp1, logp2]).double()]).cpu().tolist()  # one transfer
        for r, seq in enumerate(self.rows):
            if seq is None:
                continue
            ok = bool(host[2][r])
            self.drafted, self.accepted = self.drafted + 1, self.accepted + ok
            self.slot[r] += 1
            if self._commit(r, int(host[0][r]), host[3][r]) or not ok:
                continue
            self.slot[r] += 1
            self._commit(r, int(host[1][r]), host[4][r])

    # ---- sampling -----------------------------------------------------------------------------------------

    def _mask(self, logits: Tensor) -> Tensor:
        vocab = self.engine.vocab_size
        if vocab is not None and vocab < logits.shape[-1]:
            logits[..., vocab:] = float("-inf")  # padded vocabulary entries are never sampled
        return logits

    def _logits(self, hidden: Tensor) -> Tensor:
        """Masked logits (b, s, V) of final-normed ``hidden`` (s, b, h)."""
        return self._mask(self.decoder.head(hidden))

    def _draw(self, logits: Tensor, seeds: Tensor, counters: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row tokens (b,) from ``logits`` (b, V) and their log-probabilities (b,), broadcast from the first
        tensor-parallel rank."""
        tokens, out = sample_rows(logits, self.params, seeds, counters)
        group = self.engine._tp_group
        if group is not None:
            src = torch.distributed.get_global_rank(group, 0)
            torch.distributed.broadcast(tokens, src=src, group=group)
            torch.distributed.broadcast(out, src=src, group=group)
        return tokens, out

    def _draft(self, logits: Tensor, seeds: Tensor, counters: Tensor) -> tuple[Tensor, Tensor]:
        """The draft distribution (b, V) of the MTP ``logits`` (b, V) and a draft token (b,) drawn from it."""
        q = sampling_probs(logits, self.params)
        return q, inverse_cdf(q, row_uniforms(seeds, counters, STREAM_DRAFT))

    # ---- bookkeeping ------------------------------------------------------------------------------------

    def _commit(self, r: int, token: int, logp: float) -> bool:
        """Append a sampled token to row ``r``'s sequence; True (and the row freed) when it is finished."""
        seq = self.rows[r]
        seq.tokens.append(token)
        seq.logps.append(logp)
        reason = self.engine._stopped(seq.tokens, self.params)
        if reason is None and len(seq.tokens) == self.params.max_new_tokens:
            reason = "length"
        if reason is None:
            return False
        self.out_tokens[seq.index], self.out_logps[seq.index], self.reasons[seq.index] = seq.tokens, seq.logps, reason
        self.rows[r] = None
        return True

    def _compact(self) -> None:
        """Once no prompt waits, drop finished rows when a quarter of them are done (one dummy row stays
        when none is live, for expert-parallel peers)."""
        live = [r for r, seq in enumerate(self.rows) if seq is not None]
        if self.waiting or len(live) > 0.75 * len(self.rows) or len(self.rows) == 1:
            return
        keep = live or [0]
        idx = torch.tensor(keep, device=self.device)
        self.cache.compact(idx)
        self.tokens, self.seed_t, self.draft = self.tokens[idx], self.seed_t[idx], self.draft[idx]
        self.q = self.q[idx] if self.q is not None else None
        self.rows = [self.rows[r] for r in keep]
        self.pad, self.slot = [self.pad[r] for r in keep], [self.slot[r] for r in keep]
