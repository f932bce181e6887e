"""Compiled decode steps (``RolloutEngine(compiled=True)``, ``grpo.rollout_compile``): the same tokens and
log-probabilities as eager steps in both loops, one compilation for every batch size and length, and weights
updated in place (an optimizer step) seen by the compiled step."""

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from r1mega.config.errors import ConfigError
from r1mega.config.load import compose_config
from r1mega.config.validate import Accelerator, validate
from r1mega.models.builder import build_model
from r1mega.parallel.bootstrap import single_process
from r1mega.rollout.decode import CachedDecoder
from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.sampling import SamplingParams

COMPILED = (CachedDecoder._layer_step, CachedDecoder._attention_step)
"""What the decoder compiles: a layer with a dense MLP, and an MoE layer's attention half."""
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [100, 200, 300, 400, 500, 600, 700], [42]]
LONG = [[7] * 300, [13, 14, 15]]
"""A call longer than the decoder's first RoPE table (256 positions): the compiled decoder grows in place."""


@pytest.fixture(params=["qwen2_tiny", "dsv3_tiny"], scope="module")
def model(request):
    """A dense GQA model (each layer compiled whole) and an MLA + MoE one (its MoE layers' attention halves)."""
    cfg = compose_config([f"model={request.param}", "model.init_method_std=0.2"])
    with single_process(cfg):
        torch.manual_seed(0)
        yield request.param, build_model(cfg)[0].eval()


def _compiled_frames() -> int:
    return counters["frames"]["ok"]


@pytest.mark.parametrize("max_batch", [None, 2], ids=["default-loop", "continuous-batching"])
def test_compiled_steps_decode_what_eager_steps_decode(model, max_batch):
    name, m = model
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    stop = {RolloutEngine([m]).generate(PROMPTS[1:2], greedy)[0].token_ids[3]}
    sampled = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=10, stop_token_ids=stop)
    eager = RolloutEngine([m], max_batch=max_batch, seed=3)
    compiled = RolloutEngine([m], max_batch=max_batch, seed=3, compiled=True)
    calls = [(PROMPTS, greedy), (PROMPTS[1:2], greedy), (PROMPTS, sampled), (LONG, sampled), (PROMPTS[:3], greedy)]
    for i, (prompts, params) in enumerate(calls):
        want, got = eager.generate(prompts, params), compiled.generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want], (name, params)
        assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
        for a, b in zip(got, want, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4), name
        if i == 1:  # compiled for several rows and for one (torch specialises size 1); nothing after may compile
            warm = _compiled_frames()
    assert _compiled_frames() == warm, "a later batch size, length or sampler recompiled the step"
    variants = {fn.__name__: len(_debug_get_cache_entry_list(fn.__code__)) for fn in COMPILED}
    assert variants["_layer_step"] > 0 and (variants["_attention_step"] > 0 or name != "dsv3_tiny"), variants
    # Both loops share each variant, and a model family adds at most 3 per function (two model families have run in
    # this process at most): torch runs a function eagerly once it has 8.
    assert all(n <= 6 for n in variants.values()), variants
    assert compiled._decoder.max_len >= 300 + 10


def test_compiled_steps_see_weights_updated_in_place(model):
    name, m = model
    params = SamplingParams(temperature=0, max_new_tokens=6)
    compiled = RolloutEngine([m], compiled=True)
    before = compiled.generate(PROMPTS, params)
    weight = m.decoder.layers[-1].self_attention.linear_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(3.0)  # what an optimizer step does: new values, same storage
        want = RolloutEngine([m]).generate(PROMPTS, params)
        got = compiled.generate(PROMPTS, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want], name
        for a, b in zip(got, want, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        change = max(
            abs(x - y) for a, b in zip(got, before, strict=True) for x, y in zip(a.logprobs, b.logprobs, strict=True)
        )
        assert change > 1e-2, "the update should change the log-probabilities"
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.parametrize(
    ("overrides", "cuda", "says"),
    [
        (["parallel=tp2"], False, "TP=2"),
        (["parallel=ep2", "model=dsv3_tiny"], False, "EP=2"),
        ([], True, "CUDA"),
    ],
)
def test_rollout_compile_refused_where_it_cannot_run(overrides, cuda, says):
    cfg = compose_config(["grpo.rollout_compile=true", *overrides])
    with pytest.raises(ConfigError, match=says) as info:
        validate(cfg, 2 if overrides else 1, Accelerator(cuda=cuda, transformer_engine=False))
    assert info.value.key == "grpo.rollout_compile"
