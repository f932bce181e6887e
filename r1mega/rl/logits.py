"""Per-token quantities from full-vocabulary logits: log-probabilities of given tokens and entropy.

``logits[:, t]`` is the distribution that predicted ``labels[:, t]`` (the caller has already shifted by one).
Both functions work in float32 whatever the logits' dtype, and take a ``chunk_size``: the ``(b*t, V)``
float32 temporaries are then built ``chunk_size`` rows at a time, and under autograd each chunk is
activation-checkpointed, so backward keeps only the input logits instead of a float32 copy of them.

These take the whole vocabulary; with tensor parallelism the logits are vocab-sharded, and megatron-core's
``tensor_parallel.vocab_parallel_cross_entropy`` computes the same log-probabilities across the shards.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _rowwise(fn: Callable[..., Tensor], chunk_size: int | None, *rows: Tensor) -> Tensor:
    """``fn`` over the leading dimension of ``rows``, ``chunk_size`` rows at a time (checkpointed under autograd)."""
    n = rows[0].shape[0]
    if chunk_size is None or chunk_size >= n:
        return fn(*rows)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}")
    grad = torch.is_grad_enabled() and rows[0].requires_grad
    out = []
    for start in range(0, n, chunk_size):
        chunk = [r[start : start + chunk_size] for r in rows]
        out.append(checkpoint(fn, *chunk, use_reentrant=False) if grad else fn(*chunk))
    return torch.cat(out)


def _entropy_rows(logits: Tensor, temperature: float) -> Tensor:
    """``H = logsumexp(z) - sum_v softmax(z)_v z_v``, ``z = logits / temperature``, for ``(n, V)`` rows -> ``(n,)``.

    ``z`` is shifted by its row maximum first (``H`` is shift-invariant): otherwise both terms are of the
    logits' magnitude and their float32 difference loses digits (1e-3 at logits ~1e4).
    """
    z = logits.float() / temperature  # (n, V)
    z = z - z.amax(-1, keepdim=True).detach()  # (n, V), max 0
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)  # (n,)


def entropy_from_logits(logits: Tensor, *, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """Entropy ``H_t = -sum_v p_v log p_v`` of ``p = softmax(logits / temperature)``: ``(b, t, V) -> (b, t)``.

    Computed as ``logsumexp(z) - sum_v p_v z_v`` on max-shifted logits, which is stable for large logits. Logits must be finite
    (``-inf`` entries would give ``0 * inf``). Differentiable (for an entropy bonus); float32 result.
    """
    b, t, v = logits.shape
    fn = partial(_entropy_rows, temperature=temperature)
    return _rowwise(fn, chunk_size, logits.reshape(b * t, v)).reshape(b, t)  # (b*t, V) -> (b, t)


def _logprob_rows(logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """``log softmax(logits / temperature)[y]`` for ``(n, V)`` logits and ``(n,)`` labels -> ``(n,)``."""
    return -F.cross_entropy(logits.float() / temperature, labels, reduction="none")  # (n,)


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """``log p(labels_t)`` with ``p = softmax(logits_t / temperature)``: ``(b, t, V), (b, t) -> (b, t)``.

    Uses ``cross_entropy`` (no ``(b, t, V)`` log-softmax tensor is materialised by us). Where ``mask`` is 0
    the label is replaced by 0 before the lookup (padding may hold any id, e.g. -100 or the pad id) and
    the result is 0. Use the rollout's sampling temperature so the log-probabilities match the sampler's.
    """
    b, t, v = logits.shape
    if labels.shape != (b, t):
        raise ValueError(f"labels {tuple(labels.shape)} must have the (b, t) shape of logits {tuple(logits.shape)}")
    if mask is not None:
        labels = torch.where(mask.bool(), labels, torch.zeros_like(labels))  # (b, t)
    fn = partial(_logprob_rows, temperature=temperature)
    logp = _rowwise(fn, chunk_size, logits.reshape(b * t, v), labels.reshape(b * t)).reshape(b, t)  # (b, t)
    return logp if mask is None else torch.where(mask.bool(), logp, 0)  # (b, t)


def mask_padded_vocab(logits: Tensor, vocab: int) -> Tensor:
    """``logits (..., V)`` with the entries at ids ``>= vocab`` (the model's padded vocabulary rows beyond the
    tokenizer) set to the dtype's minimum, as the rollout engine samples: ``exp()`` gives exactly 0 and, unlike
    ``-inf``, no NaN."""
    if vocab >= logits.shape[-1]:
        return logits
    keep = torch.arange(logits.shape[-1], device=logits.device) < vocab  # (V,)
    return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
