"""Sampling settings and the per-step token sampler (temperature, top-k, top-p) of the rollout engine.

The log-probability returned for each sampled token is taken under ``log_softmax(logits / T)`` (``T = 1``
for greedy decoding), before top-k/top-p truncation: the same quantity a training forward computes from
the same logits divided by the same temperature, which is what GRPO's importance ratio needs.

Two ways to draw. ``sample_tokens`` draws the whole batch from one ``torch.Generator`` (the engine's default
path), so a row's token depends on the rows drawn with it. The per-row functions (``row_uniforms``,
``inverse_cdf``, ``speculative_accept``) draw each row from a counter-based hash of (sequence seed, token
index, purpose): a sequence samples the same tokens whichever batch it runs in and whenever it enters it,
which continuous batching and speculative decoding need (see ``scheduler``). Both draw the same way
(``_draw``: top-p by rejection from the whole distribution, no sort over the vocabulary), only their uniforms
come from different sources.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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


Uniforms = Callable[[Tensor, int], Tensor]
"""``uniforms(rows, stream)``: (n,) float64 uniforms in [0, 1), one for each of the rows ``rows`` ((n,) int64
indices into the batch), for the purpose ``stream`` (``STREAM_*``)."""


def sample_tokens(
    logits: Tensor, params: SamplingParams, generator: torch.Generator, sync_free: bool = False
) -> tuple[Tensor, Tensor]:
    """One token per row and its log-probability, drawn with uniforms from ``generator`` (the default loop's one
    generator for the batch). ``logits``: (b, V) fp32 -> ((b,) int64, (b,) fp32).

    The same sampler as ``sample_rows`` (top-p by rejection, no sort; distributed as ``sampling_probs``), fed by
    the generator instead of per-row hashes; how many uniforms a call draws depends only on the logits and the
    draws, so ranks given the same logits and generator state draw the same tokens.

    ``sync_free``: top-p by sorting the vocabulary instead (the same distribution, one uniform per row). Rejection
    redraws the rows whose draw fell outside the nucleus, and which rows those are is read on the host: on a GPU
    that waits for the forward that made the logits, which a decode loop running ahead of the host must not."""

    def uniforms(rows: Tensor, stream: int) -> Tensor:
        return torch.rand(rows.numel(), generator=generator, dtype=torch.float64, device=generator.device)

    return _draw(logits, params, uniforms, sort=sync_free)


STREAM_SAMPLE, STREAM_DRAFT, STREAM_ACCEPT, STREAM_RESIDUAL = 0, 1, 2, 3
"""What a per-row uniform is for: drawing a token from the model, drawing a draft token, the acceptance
test of a draft, and the draw from the residual distribution after a rejected draft."""
STREAM_RETRY = 16
"""Streams ``STREAM_RETRY + k`` hold the uniforms of the k-th redraw of ``sample_rows``' nucleus sampler."""
NUCLEUS_TRIES = 32
"""Draws per row before the nucleus sampler sorts instead (each is kept with probability >= top_p)."""

_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B
"""A 32-bit hash multiplier below 2**31: int64 products of 32-bit values with it never overflow."""


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash of ``x`` (int64 values in [0, 2**32))."""
    x = ((x ^ (x >> 16)) * _MIX) & _M32
    x = ((x ^ (x >> 16)) * _MIX) & _M32
    return x ^ (x >> 16)


def row_uniforms(seeds: Tensor, counters: Tensor, stream: int) -> Tensor:
    """Uniforms in [0, 1), one per row, a pure function of (seed, counter, stream) per row.

    ``seeds``, ``counters``: (b,) int64 (seeds in [0, 2**62)); returns (b,) float64. Rows never share
    state, so a row's uniform does not depend on the batch it is drawn in.
    """
    h = _mix32(torch.full_like(counters, stream + 0x9E3779B1) & _M32)
    h = _mix32(h ^ (counters & _M32))
    h = _mix32(h ^ (seeds & _M32))
    h = _mix32(h ^ ((seeds >> 32) & _M32))
    return h.double() / 2.0**32  # (b,)


def sampling_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution a token is drawn from: ``softmax(logits / T)`` restricted to the top-k / top-p set
    and renormalised; one-hot at the argmax for greedy decoding. ``logits``: (b, V) -> (b, V) fp32."""
    if params.greedy:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()  # (b, V)
    return torch.softmax(filter_logits(logits / params.temperature, params.top_k, params.top_p), dim=-1)


CDF_BLOCK = 64
"""Tokens per block of ``BlockCDF``."""


class BlockCDF:
    """The cumulative distribution of ``weights`` (n, V) >= 0, not necessarily normalised, in two levels: the
    sums of blocks of ``CDF_BLOCK`` tokens and their cumulative sums (float64). A draw finds its block among
    V / 64, then its token among the block's 64, so the vocabulary is read once (the block sums) instead of
    converted to float64 and summed cumulatively (two passes and a (n, V) float64 tensor per step)."""

    def __init__(self, weights: Tensor, sums: Tensor | None = None, cdf: Tensor | None = None) -> None:
        self.weights = weights
        if sums is None:
            vocab = weights.shape[-1]
            full = vocab // CDF_BLOCK * CDF_BLOCK
            # Block sums in the weights' dtype (64 terms each; sum(dtype=float64) would first copy every weight to
            # float64), accumulated across blocks in float64.
            parts = [weights[:, :full].unflatten(1, (-1, CDF_BLOCK)).sum(dim=-1)] if full else []
            if full < vocab:
                parts.append(weights[:, full:].sum(dim=-1, keepdim=True))
            sums = (torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]).double()  # (n, blocks)
        self.sums = sums
        self.cdf = sums.cumsum(dim=-1) if cdf is None else cdf  # (n, blocks)

    @property
    def total(self) -> Tensor:
        """(n,) float64: each row's total weight."""
        return self.cdf[:, -1]

    def rows(self, rows: Tensor) -> BlockCDF:
        """The distributions of ``rows`` only."""
        return BlockCDF(self.weights[rows], self.sums[rows], self.cdf[rows])

    def draw(self, u: Tensor) -> Tensor:
        """One token per row for uniforms ``u`` (n,): the first token whose cumulative weight exceeds ``u``
        times the row's total (never a token of weight 0). Returns (n,) int64."""
        w, vocab = self.weights, self.weights.shape[-1]
        target = (u.to(self.cdf.device, torch.float64) * self.total)[:, None]  # (n, 1)
        block = torch.searchsorted(self.cdf, target, right=True).clamp(max=self.cdf.shape[-1] - 1)  # (n, 1)
        before = self.cdf.gather(-1, block) - self.sums.gather(-1, block)  # (n, 1) weight of the blocks before
        idx = block * CDF_BLOCK + torch.arange(CDF_BLOCK, device=w.device)  # (n, 64) the block's tokens
        inner = w.gather(-1, idx.clamp(max=vocab - 1)).double() * (idx < vocab)  # (n, 64), 0 past the vocabulary
        k = torch.searchsorted(inner.cumsum(dim=-1), (target - before).clamp(min=0), right=True)  # (n, 1)
        # Rounding between the block sum and the in-block cumulative sum may put the target past the block's
        # last token: take the last token of positive weight then.
        last = (inner > 0).cumsum(dim=-1).argmax(dim=-1, keepdim=True)  # the first of the maximal counts
        return idx.gather(-1, torch.minimum(k, last)).squeeze(-1)


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """One token per row drawn from ``probs`` (b, V), not necessarily normalised, with uniforms ``u`` (b,):
    the first token whose cumulative probability exceeds ``u`` times the row's total (``BlockCDF``). Tokens of
    probability 0 are never drawn. Returns (b,) int64."""
    return BlockCDF(probs).draw(u)


def logprob_of(logits: Tensor, tokens: Tensor, params: SamplingParams) -> Tensor:
    """log p(token) under ``log_softmax(logits / T)`` (``T = 1`` for greedy), before top-k/top-p truncation:
    what ``sample_tokens`` returns and a training forward computes. ``logits``: (b, V), ``tokens``: (b,)."""
    scaled = logits if params.greedy else logits / params.temperature
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)  # (b,)


def sample_rows(logits: Tensor, params: SamplingParams, seeds: Tensor, counters: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row tokens (b,) and their log-probabilities (b,) from ``logits`` (b, V), distributed as
    ``sampling_probs`` and drawn with per-row uniforms (``row_uniforms(seeds, counters, ...)``), with
    ``logprob_of``'s log-probabilities; in fewer passes over the vocabulary than those three functions.

    Top-p alone (R1's sampling) needs no sort: a token is drawn from the whole distribution and kept when it
    is in the nucleus (the mass of the tokens more likely than it is below ``top_p``), else drawn again with
    the next uniform of its row. That is rejection sampling of the distribution restricted to the nucleus, so
    the kept token follows the truncated, renormalised distribution exactly; a draw is kept with probability
    >= ``top_p``. (Tokens tied with the nucleus' last token are all in it; a sort would cut ties anywhere.)
    With top-k, the top-k tokens are selected (``torch.topk``) and the draw is made in their order.
    """

    def uniforms(rows: Tensor, stream: int) -> Tensor:
        return row_uniforms(seeds[rows], counters[rows], stream)

    return _draw(logits, params, uniforms)


def _draw(logits: Tensor, params: SamplingParams, uniforms: Uniforms, sort: bool = False) -> tuple[Tensor, Tensor]:
    """``sample_rows`` / ``sample_tokens`` with the uniforms of ``uniforms``; ``sort``: top-p by sorting."""
    if params.greedy:
        tokens = logits.argmax(dim=-1)  # (b,)
        return tokens, logprob_of(logits, tokens, params)
    t, vocab = params.temperature, logits.shape[-1]
    rows = torch.arange(logits.shape[0], device=logits.device)
    if 0 < params.top_k < vocab or (sort and params.top_p < 1.0):
        scaled = logits / t  # (b, V)
        lse = torch.logsumexp(scaled, dim=-1, keepdim=True)  # (b, 1)
        k = params.top_k if 0 < params.top_k < vocab else vocab
        tokens = _sample_sorted(scaled, lse, params, uniforms, rows, k)
        return tokens, scaled.gather(-1, tokens[:, None]).squeeze(-1) - lse.squeeze(-1)
    # One (b, V) tensor, the unnormalised probabilities, serves the draw and the log-probability: every pass over
    # the vocabulary reads the logits or writes in place (a large new tensor costs a page fault per 4 KiB on the
    # CPU, and a pass each).
    peak = logits.amax(dim=-1, keepdim=True)  # (b, 1)
    weights = (logits - peak).div_(t).exp_()  # (b, V) = exp((logits - max) / T), unnormalised
    cdf = BlockCDF(weights)
    lse = peak / t + cdf.total.to(logits.dtype).log()[:, None]  # (b, 1) log-sum-exp of logits / T
    if params.top_p < 1.0:
        tokens = _sample_nucleus(logits, lse, cdf, params, uniforms, rows)
    else:
        tokens = cdf.draw(uniforms(rows, STREAM_SAMPLE))
    return tokens, logits.gather(-1, tokens[:, None]).squeeze(-1) / t - lse.squeeze(-1)


def _sample_sorted(
    scaled: Tensor, lse: Tensor, params: SamplingParams, uniforms: Uniforms, rows: Tensor, k: int
) -> Tensor:
    """Draw from the top-``k`` tokens (then top-p within them), in their descending order; ``rows`` are the
    batch rows of ``scaled``. (n, V) -> (n,)."""
    vocab = scaled.shape[-1]
    vals, order = torch.topk(scaled, k) if k < vocab else torch.sort(scaled, dim=-1, descending=True)  # (b, k)
    probs = (vals - lse).exp()  # (b, k) descending
    if k < vocab:
        probs = probs / probs.sum(dim=-1, keepdim=True)  # top-p acts within the top-k set
    cum = probs.double().cumsum(dim=-1)  # (b, k)
    kept = ((cum - probs) < params.top_p).sum(dim=-1, keepdim=True)  # (b, 1) >= 1: the nucleus size
    target = uniforms(rows, STREAM_SAMPLE).to(cum.device)[:, None] * cum.gather(-1, kept - 1)
    j = torch.searchsorted(cum, target, right=True).clamp(max=kept - 1)  # (b, 1) position in the order
    return order.gather(-1, j).squeeze(-1)


def _sample_nucleus(
    logits: Tensor, lse: Tensor, cdf: BlockCDF, params: SamplingParams, uniforms: Uniforms, rows: Tensor
) -> Tensor:
    """Top-p by rejection: draw from the full distribution (``cdf``: of the unnormalised probabilities), keep
    tokens inside the nucleus. ``rows``: ``arange(b)``. Returns (b,)."""
    every = cdf  # every row's distribution; ``cdf`` holds the rows still drawing
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    todo = rows  # rows still drawing
    bound = cdf.total * params.top_p  # top_p of each row's mass
    for attempt in range(NUCLEUS_TRIES):
        stream = STREAM_SAMPLE if attempt == 0 else STREAM_RETRY + attempt
        tok = cdf.draw(uniforms(todo, stream))  # (n,)
        p = cdf.weights
        # (n,) mass of the more likely tokens (a mask product: torch.where with a scalar is twice as slow on CPU)
        before = (p * (p > p.gather(-1, tok[:, None]))).sum(dim=-1)
        inside = before < bound
        tokens[todo[inside]] = tok[inside]
        todo = todo[~inside]
        if todo.numel() == 0:
            return tokens
        cdf, bound = every.rows(todo), bound[~inside]
    # Rows still drawing (a tiny top_p): sort.
    scaled = logits[todo] / params.temperature
    tokens[todo] = _sample_sorted(scaled, lse[todo], params, uniforms, todo, scaled.shape[-1])
    return tokens


def speculative_accept(
    p: Tensor, q: Tensor, draft: Tensor, u_accept: Tensor, u_residual: Tensor
) -> tuple[Tensor, Tensor]:
    """The speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023) for one drafted token per row.

    ``p`` (b, V): the model's sampling distribution at the drafted position; ``q`` (b, V): the draft's, from
    which ``draft`` (b,) was drawn. The draft is kept with probability ``min(1, p(d) / q(d))``; otherwise the
    token is drawn from ``max(p - q, 0)`` (renormalised). Either way the token is distributed exactly as
    ``p``. For one-hot (greedy) ``p`` and ``q`` this keeps the draft iff it is the argmax, else takes the
    argmax. Returns (accepted (b,) bool, token (b,) int64).
    """
    p_d = p.gather(-1, draft[:, None]).squeeze(-1).double()  # (b,)
    q_d = q.gather(-1, draft[:, None]).squeeze(-1).double()  # (b,) > 0: the draft was drawn from q
    accepted = u_accept.to(p_d.device) * q_d < p_d  # u < p(d) / q(d) without dividing
    residual = (p - q).clamp(min=0)  # (b, V)
    empty = residual.sum(dim=-1, keepdim=True) <= 0  # p == q: a rejection cannot happen, any row works
    residual = torch.where(empty, p, residual)
    return accepted, torch.where(accepted, draft, inverse_cdf(residual, u_residual))
