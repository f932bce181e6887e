"""The per-row decode loop: continuous batching gives each sequence the tokens it gets alone with its seed, and
MTP speculative decoding keeps the model's distribution (greedy tokens, sampled frequencies, log-probs)."""

import pytest
import torch
from scipy.stats import chisquare

from r1mega.config.load import compose_config
from r1mega.models.builder import build_model
from r1mega.models.forward import forward_logits
from r1mega.parallel.bootstrap import single_process
from r1mega.rollout.decode import CachedDecoder, StepInputs
from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.kv_cache import KVCache
from r1mega.rollout.sampling import SamplingParams, sampling_probs

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [100, 200, 300, 400, 500, 600, 700], [42], [7, 7, 7, 9], [3, 4, 5, 6]]
SEEDS = [101, 202, 303, 404, 505, 606]
FP32_TOL = 1e-4


def _model(name, *overrides):
    cfg = compose_config([f"model={name}", "model.init_method_std=0.2", *overrides])
    torch.manual_seed(0)
    return build_model(cfg)[0]


@pytest.fixture(params=["qwen2_tiny", "dsv3_tiny"])
def model(request):
    with single_process(compose_config([f"model={request.param}"])):
        yield request.param, _model(request.param)


def _training_logprobs(model, prompt, completion, temperature):
    with torch.no_grad():
        logits = forward_logits(model.eval(), torch.tensor([prompt + completion]))[0].float()  # (s, V)
    logp = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 : -1]
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_continuous_batching_gives_each_sequence_its_tokens_alone(model):
    """Six prompts through two rows: rows that finish (length limit or a stop token) take waiting prompts, and
    every sequence equals generating it alone with the same seed."""
    name, m = model
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10)
    alone = [
        RolloutEngine([m], max_batch=1).generate([p], params, seeds=[s])[0] for p, s in zip(PROMPTS, SEEDS, strict=True)
    ]
    stop = alone[0].token_ids[3]  # ends some sequences early, so rows free up at different steps
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, stop_token_ids=(stop,))
    engine = RolloutEngine([m], max_batch=2)
    together = engine.generate(PROMPTS, params, seeds=SEEDS)
    assert engine.stats.extra["prefills"] >= 3, engine.stats.extra  # refilled as rows finished
    assert together[0].finish_reason == "stop"
    for a, t in zip(alone, together, strict=True):
        cut = a.token_ids.index(stop) + 1 if stop in a.token_ids else len(a.token_ids)
        assert t.token_ids == a.token_ids[:cut], name
        assert t.logprobs == pytest.approx(a.logprobs[:cut], abs=FP32_TOL)
    for prompt, out in zip(PROMPTS, together, strict=True):  # and the log-probs are the training forward's
        ref = _training_logprobs(m, prompt, out.token_ids, params.temperature)
        assert (ref - torch.tensor(out.logprobs)).abs().max().item() < FP32_TOL


def test_prompts_of_similar_length_are_prefilled_together(monkeypatch):
    """Waiting prompts enter shortest first, so a refill's left-padded forward pads little; completions still come
    back in the prompts' order, each with the tokens it gets alone."""
    from r1mega.rollout import scheduler

    widths: list[tuple[int, ...]] = []
    prefill = scheduler.RowScheduler._prefill

    def spy(self, rows):
        widths.append(tuple(len(self.prompts[i]) for i in self.waiting[-len(rows) :][::-1]))
        return prefill(self, rows)

    monkeypatch.setattr(scheduler.RowScheduler, "_prefill", spy)
    lengths = [9, 2, 8, 3, 10, 1, 7, 4]
    prompts = [[10 + (i * 7 + j) % 50 for j in range(n)] for i, n in enumerate(lengths)]
    seeds = list(range(1, len(prompts) + 1))
    with single_process(compose_config(["model=qwen2_tiny"])):
        m = _model("qwen2_tiny")
        params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=3)
        together = RolloutEngine([m], max_batch=4).generate(prompts, params, seeds=seeds)
        groups = list(widths)
        alone = [
            RolloutEngine([m], max_batch=1).generate([p], params, seeds=[s])[0]
            for p, s in zip(prompts, seeds, strict=True)
        ]
    assert groups == [(1, 2, 3, 4), (7, 8, 9, 10)], groups  # in order it would be (9, 2, 8, 3): padded to 9
    assert [c.prompt_ids for c in together] == prompts
    assert [c.token_ids for c in together] == [a.token_ids for a in alone]


def test_per_row_loop_draws_seeds_from_the_engine_generator():
    with single_process(compose_config(["model=qwen2_tiny"])):
        m = _model("qwen2_tiny")
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=6, seed=5)
        a = [o.token_ids for o in RolloutEngine([m], max_batch=4).generate(PROMPTS, params)]
        assert a == [o.token_ids for o in RolloutEngine([m], max_batch=2).generate(PROMPTS, params)]
        with pytest.raises(ValueError, match="one seed per prompt"):
            RolloutEngine([m], max_batch=2).generate(PROMPTS, params, seeds=[1])
        with pytest.raises(ValueError, match="mtp_num_layers"):
            RolloutEngine([m], speculative=True)


@pytest.fixture(scope="module")
def dsv3_process():
    """One single-process context for the MTP tests (they build their models in it)."""
    with single_process(compose_config(["model=dsv3_tiny"])):
        yield


@pytest.fixture
def mtp_model(dsv3_process):
    return _model("dsv3_tiny")


def test_mtp_module_computes_what_megatron_computes(mtp_model):
    """The cached decoder's MTP logits equal those of megatron-core's MultiTokenPredictionBlock in a training
    forward (captured from the block's output and put through the shared output head)."""
    m = mtp_model.eval()
    ids, pos = torch.tensor([[5, 6, 7, 8, 9, 100, 200, 300]]), torch.arange(8)[None]
    captured = {}
    hook = m.mtp.register_forward_hook(lambda mod, args, out: captured.setdefault("h", out))
    with torch.no_grad():
        m(ids, pos, None, labels=ids)
        hook.remove()
        weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        ref = m.output_layer(captured["h"].chunk(2)[1], weight=weight)[0].transpose(0, 1).float()  # (1, s, V)
        decoder = CachedDecoder(m, 64)
        cache = KVCache(m.config, len(decoder.layers) + 1, 1, 8, torch.float32)
        bias = torch.zeros(1, 8, 8).masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
        step = StepInputs(0, pos, bias)
        hidden = decoder.hidden(ids, step, cache)
        ours = decoder.head(decoder.mtp_hidden(hidden, torch.roll(ids, -1, dims=1), step, cache))
    assert (ours[:, :-1] - ref[:, :-1]).abs().max().item() < 1e-4  # the last position has no next token


def test_speculative_greedy_equals_plain_decoding(mtp_model):
    params = SamplingParams(temperature=0, max_new_tokens=12)
    plain = RolloutEngine([mtp_model]).generate(PROMPTS, params)
    engine = RolloutEngine([mtp_model], speculative=True)
    spec = engine.generate(PROMPTS, params)
    assert engine.stats.extra["drafted"] > 0
    for a, s in zip(plain, spec, strict=True):
        assert s.token_ids == a.token_ids
        assert s.logprobs == pytest.approx(a.logprobs, abs=FP32_TOL)


def test_speculative_logprobs_equal_the_training_forward(mtp_model):
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=12)
    outs = RolloutEngine([mtp_model], speculative=True, max_batch=4).generate(PROMPTS, params, seeds=SEEDS)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert len(out.token_ids) == 12
        ref = _training_logprobs(mtp_model, prompt, out.token_ids, params.temperature)
        assert (ref - torch.tensor(out.logprobs)).abs().max().item() < FP32_TOL


@pytest.mark.parametrize("speculative", [False, True])
def test_sampled_frequencies_follow_the_model(dsv3_process, speculative):
    """On an 8-token vocabulary, 2,000 sequences of 3 tokens: the joint frequencies of the first two tokens and
    the third token's frequencies fit the model's exact distributions (chi-square), with drafts both kept and
    rejected. The first token comes from the prefill; the second is the first verified draft."""
    vocab, n, prompt = 8, 2000, [1, 2, 3]
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=3)
    m = _model("dsv3_tiny", f"model.vocab_size={vocab}", "model.init_method_std=0.5").eval()
    engine = RolloutEngine([m], vocab_size=vocab, speculative=speculative)
    outs = engine.generate([prompt] * n, params, seeds=list(range(n)))
    if speculative:
        assert 0.1 < engine.stats.extra["acceptance_rate"] < 0.9, engine.stats.extra

    def probs(seqs):  # the sampler's distribution of the next token after each sequence: (len(seqs), vocab)
        with torch.no_grad():
            logits = forward_logits(m, torch.tensor(seqs))[:, -1, :vocab].float()
        return sampling_probs(logits, params)

    first = probs([prompt])[0]  # (V,)
    second = probs([prompt + [a] for a in range(vocab)])  # (V, V): row a = p(. | a)
    joint = first[:, None] * second  # (V, V)
    pairs = [[prompt + [a, b] for b in range(vocab)] for a in range(vocab)]
    third = (joint[..., None] * torch.stack([probs(row) for row in pairs])).sum((0, 1))  # (V,)
    tokens = torch.tensor([o.token_ids for o in outs])  # (n, 3)
    for observed, expected in (
        (torch.bincount(tokens[:, 0] * vocab + tokens[:, 1], minlength=vocab**2), joint.flatten()),
        (torch.bincount(tokens[:, 2], minlength=vocab), third),
    ):
        expected = expected.double() * n
        assert observed[expected == 0].sum() == 0  # nothing outside the top-p set
        keep = expected >= 5  # chi-square needs expected counts >= 5: the rare cells pooled into one
        obs = torch.cat([observed[keep].double(), observed[~keep].sum()[None].double()])
        exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
        obs, exp = obs[exp > 0], exp[exp > 0]
        assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3
