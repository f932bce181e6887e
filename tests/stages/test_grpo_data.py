"""GRPO's micro-batch layouts without a model: packing plans, and where each response's tokens, labels, positions,
attention and response-space index land in padded and packed rows."""

from __future__ import annotations

import pytest
import torch

from r1mega.data.prompts import Prompt
from r1mega.rollout import Completion
from r1mega.stages.grpo_data import (
    Sample,
    make_batch,
    padded_columns,
    plan_packed,
    plan_padded,
    response_values,
)

PAD = 0


def sample(prompt: list[int], response: list[int], advantage: float = 1.0, trained: bool = True) -> Sample:
    logprobs = [-0.1 * (i + 1) for i in range(len(response))]
    completion = Completion(prompt, response, logprobs, "", "eos")
    return Sample(Prompt("p0", "q", "a"), prompt, completion, advantage=advantage, trained=trained)


def test_plans_cover_every_sample_once_within_the_budget() -> None:
    assert plan_padded(5, 2) == [[[0], [1]], [[2], [3]], [[4]]]
    lengths = [5, 9, 3, 7, 2, 12]
    plan = plan_packed(lengths, budget=10)
    rows = [row for mb in plan for row in mb]
    assert all(len(mb) == 1 for mb in plan)  # one packed row per micro-batch
    assert sorted(i for row in rows for i in row) == list(range(6))
    # first fit, longest first: 12 (over the budget) and 9 alone, 7 + 3, 5 + 2
    assert rows == [[5], [1], [3, 2], [0, 4]]


def test_packed_row_holds_each_response_as_its_own_sequence() -> None:
    a = sample([11, 12, 13], [21, 22])
    b = sample([14, 15], [23, 24, 25], advantage=-1.0, trained=False)
    batch = make_batch([[a, b]], width=12, pad_id=PAD, with_ref=False, correct=True)
    assert batch["tokens"][0].tolist() == [11, 12, 13, 21, 22, 14, 15, 23, 24, 25, PAD, PAD]
    assert batch["position_ids"][0, :10].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    # labels stop at each sequence's end: no position learns the next response's first token
    assert batch["labels"][0].tolist() == [12, 13, 21, 22, PAD, 15, 23, 24, 25, PAD, PAD, PAD]
    # response space: a's two tokens, b's three; b is untrained (mask 0) but its tokens are indexed
    index = batch["index"]
    assert index.tolist() == [[2, 3, 0], [6, 7, 8]]
    assert response_values(batch["labels"], index).tolist() == [[21, 22, 12], [23, 24, 25]]
    assert batch["mask"].tolist() == [[1, 1, 0], [0, 0, 0]]
    assert batch["lengths"].tolist() == [2, 3]
    assert batch["advantages"].tolist() == [1.0, -1.0]
    assert batch["old_logp"][0, :2].tolist() == pytest.approx([-0.1, -0.2])
    assert batch["loss_mask"][0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    masked = batch["attention_mask"][0, 0]  # (s, s), True = masked out
    assert not masked[4, 0] and masked[5, 4] and not masked[9, 5] and masked[3, 4]  # own sequence, causal
    assert "ref_logp" not in batch and batch["rollout_logp"].shape == (2, 3)


def test_padded_rows_have_no_attention_mask_and_an_empty_microbatch_keeps_its_shapes() -> None:
    a, b = sample([1, 2], [3]), sample([4, 5, 6], [7, 8])
    batch = make_batch([[a], [b]], width=5, pad_id=PAD, with_ref=True, correct=False)
    assert "attention_mask" not in batch  # plain causal attention
    assert batch["index"].tolist() == [[1, 0], [5 + 2, 5 + 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 2
    empty = make_batch([[]], width=4, pad_id=PAD, with_ref=True, correct=True)
    assert empty["mask"].sum() == 0 and empty["index"].shape == (1, 1) and empty["lengths"].tolist() == [0]
    with pytest.raises(ValueError, match="row 0 needs 5 tokens"):
        make_batch([[b]], width=4, pad_id=PAD, with_ref=False, correct=False)


def test_padded_columns() -> None:
    old, ref, mask = padded_columns([[1.0, 2.0], [3.0]], [[4.0, 5.0], [6.0]])
    assert old.tolist() == [[1, 2], [3, 0]] and ref.tolist() == [[4, 5], [6, 0]]
    assert mask.tolist() == [[True, True], [True, False]]
    assert torch.is_tensor(mask)
