"""Top-k / top-p filtering and the sampled token's log-probability, against hand-computed values."""

import math

import pytest
import torch

from r1mega.rollout.sampling import SamplingParams, filter_logits, sample_tokens


def _logits(probs):
    return torch.log(torch.tensor([probs]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = _logits([0.5, 0.3, 0.15, 0.05])
    kept = filter_logits(logits, top_k=0, top_p=0.8).isfinite()[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert filter_logits(logits, 0, 0.81).isfinite()[0].tolist() == [True, True, True, False]
    assert filter_logits(logits, 0, 0.1).isfinite()[0].tolist() == [True, False, False, False]  # top token stays


def test_top_p_handles_unsorted_rows_independently():
    logits = torch.cat([_logits([0.05, 0.15, 0.3, 0.5]), _logits([0.3, 0.5, 0.05, 0.15])])
    kept = filter_logits(logits, 0, 0.8).isfinite().tolist()
    assert kept == [[False, False, True, True], [True, True, False, False]]


def test_top_k():
    logits = _logits([0.1, 0.4, 0.2, 0.3])
    assert filter_logits(logits, top_k=2, top_p=1.0).isfinite()[0].tolist() == [False, True, False, True]


def test_sampled_logprob_is_taken_before_truncation_at_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0.5, top_p=0.5, max_new_tokens=1)
    tokens, logp = sample_tokens(logits, params, torch.Generator().manual_seed(0))
    assert tokens.item() == 0  # top-p 0.5 leaves only the first token
    expected = 4.0 - math.log(math.exp(4.0) + math.exp(2.0) + 1.0)  # log_softmax(logits / 0.5)[0]
    assert logp.item() == pytest.approx(expected, abs=1e-6)


def test_greedy_and_sampling_frequencies():
    logits = _logits([0.6, 0.3, 0.1]).expand(20000, 3)
    greedy, lp = sample_tokens(logits, SamplingParams(temperature=0), torch.Generator())
    assert greedy.eq(0).all() and lp[0].item() == pytest.approx(math.log(0.6), abs=1e-6)
    tokens, _ = sample_tokens(logits, SamplingParams(temperature=1.0, top_p=1.0), torch.Generator().manual_seed(1))
    freq = torch.bincount(tokens, minlength=3).float() / len(tokens)
    assert freq.tolist() == pytest.approx([0.6, 0.3, 0.1], abs=0.015)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_new_tokens=0)])
def test_bad_params_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
