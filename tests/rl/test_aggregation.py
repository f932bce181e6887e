"""Loss aggregation modes against hand-computed values; padding, empty responses and global normalisers."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.rl.aggregation import LOSS_AGG_MODES, aggregate_loss, local_normalizers

NAN = math.nan
MODES = LOSS_AGG_MODES.names()
L_MAX = 8

# three sequences: tokens [1, 2, 3] | [4] | empty; padding holds garbage
LOSS = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, 1e9, NAN, -math.inf], [NAN, 7.0, 7.0, 7.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


def _agg(mode: str, loss: torch.Tensor = LOSS, mask: torch.Tensor = MASK, **kw: object) -> torch.Tensor:
    return aggregate_loss(loss, mask, mode, max_response_length=L_MAX, **kw)  # type: ignore[arg-type]


def test_hand_values() -> None:
    assert _agg("token-mean").item() == 2.5  # (1 + 2 + 3 + 4) / 4 tokens
    assert _agg("seq-mean-token-mean").item() == 3.0  # (6/3 + 4/1) / 2 non-empty sequences
    assert _agg("seq-mean-token-sum").item() == 5.0  # (6 + 4) / 2
    assert _agg("seq-mean-token-sum-norm").item() == 0.625  # (6 + 4) / (2 * 8)


def test_local_normalizers() -> None:
    tokens, seqs = local_normalizers(MASK)
    assert (tokens.item(), seqs.item()) == (4, 2)


@pytest.mark.parametrize("mode", MODES)
def test_empty_rows_and_batches(mode: str) -> None:
    # the empty third row changes nothing
    assert _agg(mode).item() == _agg(mode, LOSS[:2], MASK[:2]).item()
    # a batch with no valid token gives 0, not NaN
    assert _agg(mode, LOSS, torch.zeros_like(MASK)).item() == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_single_token_responses(mode: str) -> None:
    loss, mask = torch.tensor([[2.0, NAN], [4.0, NAN]]), torch.tensor([[1, 0], [1, 0]])
    expected = {"token-mean": 3.0, "seq-mean-token-mean": 3.0, "seq-mean-token-sum": 3.0}
    assert _agg(mode, loss, mask).item() == expected.get(mode, 3.0 / L_MAX)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_with_global_normalizers_equal_one_batch(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    b, t = 6, 7
    weight = torch.randn(b, t, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 1, 0, 3, 5, 2])  # micro-batches get 8 and 10 valid tokens
    mask = torch.arange(t)[None, :] < lengths[:, None]

    def per_token(rows: slice) -> torch.Tensor:
        return torch.where(mask[rows], weight[rows].square() + weight[rows], NAN)  # garbage in padding

    full = aggregate_loss(per_token(slice(None)), mask, mode, max_response_length=L_MAX)
    (grad_full,) = torch.autograd.grad(full, weight)

    halves = [slice(0, 3), slice(3, 6)]
    counts = [local_normalizers(mask[h]) for h in halves]
    global_tokens = sum(c[0] for c in counts)  # what all_reduce(SUM) over micro-batches/ranks gives
    global_seqs = sum(c[1] for c in counts)
    parts = [
        aggregate_loss(
            per_token(h),
            mask[h],
            mode,
            global_tokens=global_tokens,
            global_seqs=global_seqs,
            max_response_length=L_MAX,
        )
        for h in halves
    ]
    (grad_parts,) = torch.autograd.grad(sum(parts), weight)
    torch.testing.assert_close(sum(parts), full)
    torch.testing.assert_close(grad_parts, grad_full)

    # without the global normaliser, averaging the micro-batch losses is not the one-batch value
    local = [aggregate_loss(per_token(h), mask[h], mode, max_response_length=L_MAX) for h in halves]
    if mode == "token-mean":
        assert not torch.allclose((local[0] + local[1]) / 2, full)


def test_global_normalizer_types() -> None:
    # token-mean over 4 local tokens, but the global batch has 8: 10 / 8
    for n in (8, 8.0, torch.tensor(8), torch.tensor(8.0)):
        assert _agg("token-mean", global_tokens=n).item() == 1.25
    assert _agg("seq-mean-token-sum", global_seqs=5).item() == 2.0
    assert _agg("seq-mean-token-sum", global_tokens=100).item() == 5.0  # unused by this mode
    assert _agg("token-mean", global_tokens=0).item() == 2.5 * 4  # 0 is treated as 1, never a division by 0


def test_gradients_ignore_padding() -> None:
    loss = torch.tensor([[1.0, 2.0, 5.0], [3.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    aggregate_loss(loss, mask, "seq-mean-token-mean").backward()
    assert loss.grad is not None
    assert loss.grad.tolist() == [[0.25, 0.25, 0.0], [0.5, 0.0, 0.0]]


def test_errors() -> None:
    with pytest.raises(ValueError, match="max_response_length"):
        aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="same"):
        aggregate_loss(LOSS, MASK[:, :2], "token-mean")
    with pytest.raises(KeyError, match="valid: seq-mean-token-mean"):
        aggregate_loss(LOSS, MASK, "mean")
