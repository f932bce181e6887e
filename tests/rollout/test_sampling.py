"""Top-k / top-p filtering, the sampled token's log-probability, the per-row sampler and the speculative-sampling
rule, against hand-computed values."""

import math

import pytest
import torch

from r1mega.rollout.sampling import (
    STREAM_ACCEPT,
    STREAM_DRAFT,
    STREAM_RESIDUAL,
    STREAM_SAMPLE,
    BlockCDF,
    SamplingParams,
    filter_logits,
    inverse_cdf,
    logprob_of,
    row_uniforms,
    sample_rows,
    sample_tokens,
    sampling_probs,
    speculative_accept,
)


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


def test_row_uniforms_are_per_row_functions_of_seed_counter_and_stream():
    seeds, counters = torch.tensor([1, 2, 2**40 + 1, 1]), torch.tensor([0, 0, 0, 5])
    u = row_uniforms(seeds, counters, STREAM_SAMPLE)
    assert u.dtype == torch.float64 and ((u >= 0) & (u < 1)).all()
    assert len(set(u.tolist())) == 4  # seed, high seed bits and counter all matter
    alone = [row_uniforms(seeds[i : i + 1], counters[i : i + 1], STREAM_SAMPLE).item() for i in range(4)]
    assert u.tolist() == alone  # no state shared between rows
    assert (row_uniforms(seeds, counters, STREAM_DRAFT) != u).all()
    many = row_uniforms(torch.full((20000,), 7), torch.arange(20000), STREAM_SAMPLE)
    assert many.mean().item() == pytest.approx(0.5, abs=0.01) and many.std().item() == pytest.approx(12**-0.5, abs=0.01)


def test_inverse_cdf_hand_values():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 2.0, 2.0]])  # second row unnormalised
    assert inverse_cdf(probs, torch.tensor([0.49, 0.49])).tolist() == [0, 2]
    assert inverse_cdf(probs, torch.tensor([0.5, 0.5])).tolist() == [2, 3]  # never the zero-probability token 1
    assert inverse_cdf(probs, torch.tensor([0.99, 0.0])).tolist() == [3, 2]


@pytest.mark.parametrize("vocab", [5, 64, 200, 8192])
def test_block_cdf_draws_what_the_flat_cumulative_sum_draws(vocab):
    """The two-level draw (block sums, then the block's 64 tokens) picks the token the float64 cumulative sum over
    the whole vocabulary picks, for the same uniforms, with whole blocks and single tokens of weight 0 and a
    vocabulary that is not a multiple of the block; a token of weight 0 is never drawn."""
    g = torch.Generator().manual_seed(vocab)
    w = torch.rand(6, vocab, generator=g) ** 4
    w[w < 0.05] = 0.0
    w[1, : vocab // 2] = 0.0  # half a row (whole blocks) of weight 0
    w[2, :] = 0.0
    w[2, -1] = 3.0  # all the weight on the last token, past the last whole block
    u = torch.cat(
        [torch.rand(4000, generator=g, dtype=torch.float64), torch.tensor([0.0, 1 - 2**-32], dtype=torch.float64)]
    )
    rows = torch.arange(6).repeat_interleave(len(u) // 6 + 1)[: len(u)]
    flat = w[rows].double().cumsum(dim=-1)
    expected = torch.searchsorted(flat, (u * flat[:, -1])[:, None], right=True).squeeze(-1)
    drawn = BlockCDF(w[rows]).draw(u)
    assert (w[rows].gather(-1, drawn[:, None]) > 0).all()
    assert torch.equal(drawn, expected.clamp(max=vocab - 1))
    assert (drawn[rows == 2] == vocab - 1).all()
    block = BlockCDF(w)
    assert block.total.tolist() == pytest.approx(w.double().sum(dim=-1).tolist())
    assert block.rows(torch.tensor([2, 0])).draw(torch.tensor([0.5, 0.0])).tolist() == [
        vocab - 1,
        int((w[0] > 0).nonzero()[0]),
    ]


def test_sampling_probs_truncate_and_renormalise():
    logits = _logits([0.5, 0.3, 0.15, 0.05])
    probs = sampling_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert probs[0].tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])
    assert sampling_probs(logits, SamplingParams(temperature=0))[0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_speculative_accept_hand_values():
    # p = [0.5, 0.5], q = [0.8, 0.2]. Draft 0: kept with probability p/q = 0.625, else the residual
    # max(p - q, 0) = [0, 0.3] gives token 1. Draft 1: p/q > 1, always kept.
    p, q = torch.tensor([[0.5, 0.5]]).expand(3, 2), torch.tensor([[0.8, 0.2]]).expand(3, 2)
    accepted, tokens = speculative_accept(
        p, q, torch.tensor([0, 0, 1]), torch.tensor([0.62, 0.63, 0.99]), torch.tensor([0.5, 0.5, 0.5])
    )
    assert accepted.tolist() == [True, False, True] and tokens.tolist() == [0, 1, 1]
    # Greedy (one-hot) distributions: the draft is kept iff it is the argmax, else the argmax is taken.
    hot = torch.eye(3)
    accepted, tokens = speculative_accept(
        hot[[2, 2]], hot[[2, 0]], torch.tensor([2, 0]), torch.zeros(2), torch.zeros(2)
    )
    assert accepted.tolist() == [True, False] and tokens.tolist() == [2, 2]


def test_speculative_accept_samples_the_target_distribution():
    """Drafts from a poor q, kept or replaced by the rule: the tokens follow p (20,000 draws)."""
    n = 20000
    p, q = torch.tensor([[0.6, 0.3, 0.1]]).expand(n, 3), torch.tensor([[0.1, 0.2, 0.7]]).expand(n, 3)
    seeds, counters = torch.full((n,), 3), torch.arange(n)
    draft = inverse_cdf(q, row_uniforms(seeds, counters, STREAM_DRAFT))
    u_a, u_r = row_uniforms(seeds, counters, STREAM_ACCEPT), row_uniforms(seeds, counters, STREAM_RESIDUAL)
    accepted, tokens = speculative_accept(p, q, draft, u_a, u_r)
    freq = torch.bincount(tokens, minlength=3).float() / n
    assert freq.tolist() == pytest.approx([0.6, 0.3, 0.1], abs=0.015)
    assert accepted.float().mean().item() == pytest.approx(0.1 + 0.2 + 0.1, abs=0.015)  # sum of min(p, q)


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=0.7, top_p=0.9), dict(top_p=0.01), dict(temperature=1.0, top_k=5, top_p=0.8), dict(top_p=1.0)],
)
@pytest.mark.parametrize("sampler", ["rows", "generator", "sync_free"])
def test_samplers_follow_sampling_probs(kwargs, sampler):
    """The per-row sampler and the default loop's (top-p by rejection, with a sort after 32 rejections as for
    top_p=0.01; top-k in its order; or top-p by a sort, ``sync_free``) follow ``sampling_probs`` over 20,000
    rows (per-row seeds, or one generator) and return ``logprob_of``'s log-probabilities."""
    params = SamplingParams(**kwargs)
    logits = (torch.randn(1, 12, generator=torch.Generator().manual_seed(0)) * 2).expand(20000, 12)
    if sampler == "rows":
        tokens, logps = sample_rows(logits, params, torch.arange(20000), torch.full((20000,), 3))
    else:
        generator = torch.Generator().manual_seed(3)
        tokens, logps = sample_tokens(logits, params, generator, sync_free=sampler == "sync_free")
    freq = torch.bincount(tokens, minlength=12).float() / len(tokens)
    assert freq.tolist() == pytest.approx(sampling_probs(logits[:1], params)[0].tolist(), abs=0.012)
    assert (logps - logprob_of(logits, tokens, params)).abs().max().item() < 1e-5


def test_the_sync_free_sampler_draws_one_uniform_per_row():
    """Top-p by a sort takes exactly one uniform per row from the generator: how far the generator moves
    never depends on the draws, so nothing about them has to be read on the host."""
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1)) * 3
    params = SamplingParams(temperature=0.6, top_p=0.95)
    g = torch.Generator().manual_seed(7)
    sample_tokens(logits, params, g, sync_free=True)
    after = torch.rand(1, generator=g, dtype=torch.float64)
    expected = torch.Generator().manual_seed(7)
    torch.rand(64, generator=expected, dtype=torch.float64)
    assert torch.equal(after, torch.rand(1, generator=expected, dtype=torch.float64))
