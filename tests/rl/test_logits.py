"""Entropy and token log-probabilities from logits: hand values, stability, chunking, masking, temperature."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.rl.logits import entropy_from_logits, token_logprobs

# logits [0, ln 3] -> p = [1/4, 3/4]
TWO = torch.tensor([[[0.0, math.log(3.0)]]])


def _random_logits(seed: int, b: int = 3, t: int = 5, v: int = 11) -> torch.Tensor:
    return torch.randn(b, t, v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def test_entropy_hand_values() -> None:
    assert entropy_from_logits(TWO).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    torch.testing.assert_close(entropy_from_logits(torch.zeros(2, 3, 4)), torch.full((2, 3), math.log(4)))


def test_entropy_is_stable_for_large_logits() -> None:
    h = entropy_from_logits(torch.tensor([[[1e4, 0.0, 0.0], [1e4, 1e4, -1e4]]]))
    torch.testing.assert_close(h, torch.tensor([[0.0, math.log(2)]]))


def test_entropy_matches_categorical_and_is_float32() -> None:
    logits = _random_logits(0)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected.float())
    assert entropy_from_logits(logits.bfloat16()).dtype == torch.float32
    torch.testing.assert_close(entropy_from_logits(logits, temperature=2.0), entropy_from_logits(logits / 2))


def test_entropy_chunked_equals_unchunked() -> None:
    a = _random_logits(1).requires_grad_()
    b = a.detach().clone().requires_grad_()
    ha, hb = entropy_from_logits(a), entropy_from_logits(b, chunk_size=4)  # 15 rows in chunks of 4
    torch.testing.assert_close(ha, hb)
    weights = torch.arange(15.0).reshape(3, 5)
    (ha * weights).sum().backward()
    (hb * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(a, chunk_size=0)


def test_token_logprobs_hand_values() -> None:
    out = token_logprobs(TWO.expand(1, 2, 2), torch.tensor([[1, 0]]))
    torch.testing.assert_close(out, torch.tensor([[math.log(0.75), math.log(0.25)]]))


def test_token_logprobs_match_log_softmax_and_chunking() -> None:
    logits = _random_logits(2)
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(3))
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    la, lb = token_logprobs(a, labels), token_logprobs(b, labels, chunk_size=2)
    torch.testing.assert_close(la, expected.float())
    torch.testing.assert_close(lb, la)
    la.sum().backward()
    lb.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert token_logprobs(logits.bfloat16(), labels).dtype == torch.float32
    scaled = torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, labels, temperature=0.7), scaled.float())


def test_token_logprobs_masked_labels() -> None:
    logits = _random_logits(4, b=2, t=3).requires_grad_()
    labels = torch.tensor([[1, 2, -100], [10**6, -1, 5]])  # out-of-range ids only where masked
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    out = token_logprobs(logits, labels, mask=mask)
    assert torch.all(out[~mask.bool()] == 0)
    ref = torch.log_softmax(logits.detach(), -1)
    assert out[0, 1].item() == pytest.approx(ref[0, 1, 2].item(), rel=1e-6)
    out.sum().backward()
    assert logits.grad is not None and torch.all(logits.grad[~mask.bool()] == 0)
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(logits, labels[:, :2])
