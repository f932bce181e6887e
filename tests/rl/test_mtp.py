"""The MTP term of the RL loss: hand values, which target each depth is scored against, masking at row ends."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.rl.mtp import mtp_cross_entropy


def test_depth_one_scores_the_label_one_place_on() -> None:
    # One row of 4 positions, V=2. labels[t] is the main head's target at t; depth 1 at t is scored on labels[t+1].
    labels = torch.tensor([[0, 1, 1, 0]])
    loss_mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])  # labels 1..3 are response tokens
    # depth-1 logits: at t=0 predicts labels[1]=1 with p=3/4; t=1 -> labels[2]=1 with p=1/2; t=2 -> labels[3]=0 p=1/4
    z = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0], [math.log(3), 0.0], [5.0, -5.0]]])
    total, correct, count = mtp_cross_entropy([z], labels, loss_mask)
    assert count.item() == 3  # t = 0, 1, 2; t = 3's target would be past the row's end
    assert total.item() == pytest.approx(-(math.log(0.75) + math.log(0.5) + math.log(0.75)))
    # top-1: t=0 says 1 (right), t=1 ties -> argmax 0 (wrong), t=2 says 0 (right)
    assert correct.item() == 2


def test_depth_two_and_untrained_targets() -> None:
    labels = torch.tensor([[3, 1, 2, 0, 1]])
    loss_mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]])  # label 2 untrained (e.g. an overlong-filtered response)
    v = 4
    heads = [torch.zeros(1, 5, v), torch.zeros(1, 5, v)]  # uniform: every trained target costs ln 4
    total, correct, count = mtp_cross_entropy(heads, labels, loss_mask)
    # depth 1 targets labels[1..4] masked [1, 0, 1, 1] -> 3; depth 2 targets labels[2..4] masked [0, 1, 1] -> 2
    assert total.item() == pytest.approx(5 * math.log(v))
    assert count.item() == 3  # depth 1's targets only


def test_gradient_reaches_only_trained_positions() -> None:
    labels = torch.tensor([[1, 2, 3, 0]])
    loss_mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    z = torch.randn(1, 4, 5, requires_grad=True)
    total, _, _ = mtp_cross_entropy([z], labels, loss_mask)
    total.backward()
    # depth 1 at t is trained where loss_mask[t+1] = 1: t = 1, 2
    assert [bool(z.grad[0, t].abs().sum() > 0) for t in range(4)] == [False, True, True, False]
