"""Loss aggregation modes (verl's ``loss_agg_mode``): a per-token loss ``L (b, t)`` and mask ``m (b, t)`` to a scalar.

Notation: ``n_i = sum_t m_{i,t}`` valid tokens of sequence i, ``N = sum_i n_i`` valid tokens of the batch,
``S = #{i : n_i > 0}`` sequences with at least one valid token. Sequences with no valid token (an empty
response) contribute nothing and are not counted in ``S``; padding never contributes, whatever it holds.

Global normalisers (gradient accumulation and data parallelism)
---------------------------------------------------------------
A big batch split into micro-batches (and over data-parallel ranks) gives the same loss and gradients as
one pass over it when every micro-batch divides by the *big batch's* counts instead of its own:

1. per micro-batch, ``tokens, seqs = local_normalizers(mask)``;
2. sum them over the micro-batches of the step and ``all_reduce(SUM)`` over the data-parallel group:
   that gives ``global_tokens = N`` and ``global_seqs = S``;
3. call :func:`aggregate_loss` with them; the per-micro-batch results then *sum* to the one-batch value.

A framework that *averages* micro-batch losses instead of summing them must be compensated: megatron-core
divides each micro-batch loss by ``num_microbatches`` (schedules, 2-output ``loss_func``) and its DDP
averages gradients over the ``D`` data-parallel ranks, so multiply the result by ``num_microbatches * D``.
Per-sequence means (``seq-mean-token-mean``) stay exact as long as a sequence is not split across
micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from r1mega.rl.registry import Registry

AggFn = Callable[..., Tensor]
"""``(loss (b,t), mask (b,t), *, global_tokens, global_seqs, max_response_length) -> scalar``."""

LOSS_AGG_MODES: Registry[AggFn] = Registry("loss aggregation mode")
register_loss_agg = LOSS_AGG_MODES.register
get_loss_agg = LOSS_AGG_MODES.get

Count = Tensor | float | int | None
"""A normaliser: ``None`` (use this batch's own count), a Python number or a scalar tensor."""


def local_normalizers(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(N, S)`` of this (micro-)batch: valid tokens and sequences with at least one valid token.

    Sum these over micro-batches and data-parallel ranks to get ``global_tokens`` / ``global_seqs``.
    """
    n_i = mask.bool().sum(-1)  # (b,)
    return n_i.sum(), (n_i > 0).sum()


def _denominator(local: Tensor, given: Count, like: Tensor) -> Tensor:
    """``given`` (or ``local`` when None) as a scalar of ``like``'s dtype; 0 becomes 1 so 0/0 gives 0."""
    d = local if given is None else given
    d = torch.as_tensor(d, dtype=like.dtype, device=like.device)
    return torch.where(d > 0, d, torch.ones_like(d))


def _token_sums(loss: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence ``sum_t m L`` ``(b,)`` and per-sequence valid-token counts ``n_i`` ``(b,)``."""
    m = mask.bool()  # (b, t)
    return torch.where(m, loss, 0).sum(-1), m.sum(-1)  # (b,), (b,)


@register_loss_agg("token-mean")
def token_mean(
    loss: Tensor,
    mask: Tensor,
    *,
    global_tokens: Count = None,
    global_seqs: Count = None,
    max_response_length: int | None = None,
) -> Tensor:
    """``sum_{i,t} m L / N``: every valid token weighs the same (DAPO; verl's default).

    ``N`` is ``global_tokens`` when given. ``global_seqs`` and ``max_response_length`` are unused.
    """
    seq_sums, n_i = _token_sums(loss, mask)  # (b,), (b,)
    return seq_sums.sum() / _denominator(n_i.sum(), global_tokens, seq_sums)


@register_loss_agg("seq-mean-token-mean")
def seq_mean_token_mean(
    loss: Tensor,
    mask: Tensor,
    *,
    global_tokens: Count = None,
    global_seqs: Count = None,
    max_response_length: int | None = None,
) -> Tensor:
    """``(1/S) sum_i (1/n_i) sum_t m L``: the mean over sequences of each sequence's token mean (GRPO paper).

    ``S`` is ``global_seqs`` when given. ``global_tokens`` and ``max_response_length`` are unused.
    """
    seq_sums, n_i = _token_sums(loss, mask)  # (b,), (b,)
    seq_means = seq_sums / n_i.clamp(min=1).to(seq_sums.dtype)  # (b,) 0 for empty sequences
    return seq_means.sum() / _denominator((n_i > 0).sum(), global_seqs, seq_sums)


@register_loss_agg("seq-mean-token-sum")
def seq_mean_token_sum(
    loss: Tensor,
    mask: Tensor,
    *,
    global_tokens: Count = None,
    global_seqs: Count = None,
    max_response_length: int | None = None,
) -> Tensor:
    """``(1/S) sum_i sum_t m L``: the mean over sequences of each sequence's token sum.

    ``S`` is ``global_seqs`` when given. ``global_tokens`` and ``max_response_length`` are unused.
    """
    seq_sums, n_i = _token_sums(loss, mask)  # (b,), (b,)
    return seq_sums.sum() / _denominator((n_i > 0).sum(), global_seqs, seq_sums)


@register_loss_agg("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(
    loss: Tensor,
    mask: Tensor,
    *,
    global_tokens: Count = None,
    global_seqs: Count = None,
    max_response_length: int | None = None,
) -> Tensor:
    """``(1/S) sum_i sum_t m L / L_max`` with a constant ``L_max = max_response_length`` (Dr. GRPO).

    Dividing by a constant instead of ``n_i`` removes GRPO's length bias (TRL's ``dr_grpo`` loss:
    ``sum / (batch * max_completion_length)``). verl divides ``sum_{i,t} m L`` by the padded width only,
    not by the number of sequences: a constant factor ``S`` apart. ``S`` is ``global_seqs`` when given;
    ``global_tokens`` is unused.
    """
    if max_response_length is None or max_response_length <= 0:
        raise ValueError(
            "loss_agg_mode 'seq-mean-token-sum-norm' divides by a constant: pass max_response_length "
            f"(a positive int, the generation limit), got {max_response_length!r}"
        )
    seq_sums, n_i = _token_sums(loss, mask)  # (b,), (b,)
    return seq_sums.sum() / (_denominator((n_i > 0).sum(), global_seqs, seq_sums) * max_response_length)


def aggregate_loss(
    loss: Tensor,
    mask: Tensor,
    mode: str,
    *,
    global_tokens: Count = None,
    global_seqs: Count = None,
    max_response_length: int | None = None,
) -> Tensor:
    """Aggregate a per-token loss ``(b, t)`` to a scalar with the named ``loss_agg_mode``.

    See the module docstring for the formulas and for how ``global_tokens`` / ``global_seqs`` make
    micro-batches and data-parallel ranks add up to one big batch.
    """
    if loss.shape != mask.shape:
        raise ValueError(f"loss {tuple(loss.shape)} and mask {tuple(mask.shape)} must have the same (b, t) shape")
    return get_loss_agg(mode)(
        loss,
        mask,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        max_response_length=max_response_length,
    )
