"""The CUDA-graph path of the rollout engine, on the CPU: everything but the capture itself.

The static decode step (a slot index on the device, attention over a fixed number of cache slots with the
rest masked) gives the sliced step's logits; and the engine's graph layout (a persistent cache, padded
batch buckets, in-place compaction, length buckets) run with an eager stand-in for the captured graph
gives the eager engine's tokens and log-probabilities. The capture is tested on a GPU
(``tests/gpu/test_rollout_gpu.py``).
"""

import pytest
import torch

from r1mega.config.load import compose_config
from r1mega.models.builder import build_model, transformer_config
from r1mega.models.forward import forward_logits
from r1mega.parallel.bootstrap import single_process
from r1mega.rollout import engine as engine_module
from r1mega.rollout.decode import CachedDecoder, StepInputs
from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.graphs import GraphedDecoder, batch_bucket, graph_refusal, length_bucket, length_capacity
from r1mega.rollout.kv_cache import KVCache
from r1mega.rollout.sampling import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [100, 200, 300, 400, 500, 600, 700], [42], [7, 7, 7, 9], [3, 1, 4]]


@pytest.fixture(params=["qwen2_tiny", "llama_tiny", "dsv3_tiny"])
def model(request):
    cfg = compose_config([f"model={request.param}", "model.init_method_std=0.2"])
    with single_process(cfg):
        torch.manual_seed(0)
        yield request.param, build_model(cfg)[0].eval()


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 12, 13, 17, 25, 33, 48, 49, 64, 65)] == [
        1, 2, 4, 8, 8, 12, 12, 16, 24, 32, 48, 48, 64, 64, 96,
    ]  # fmt: skip
    assert all(batch_bucket(n) >= n for n in range(1, 600))
    assert [length_bucket(k, 384) for k in (1, 128, 129, 256, 257, 384)] == [128, 128, 256, 256, 384, 384]
    assert length_capacity(300) == 384 and length_capacity(384) == 384


def test_static_step_equals_sliced_step(model):
    """One decode step written at a device-tensor slot, attending to every slot of the cache under a mask
    (stale values in the masked slots included), gives the sliced step's logits and cache writes."""
    name, m = model
    b, width, max_len = 3, 6, 40
    decoder = CachedDecoder(m, max_len)
    with torch.no_grad():
        cache = KVCache(m.config, len(decoder.layers), b, max_len, torch.float32, tp=decoder.tp)
        ids = torch.randint(10, 200, (b, width), generator=torch.Generator().manual_seed(1))
        positions = torch.arange(width)[None].expand(b, width)
        causal = torch.zeros(width, width).masked_fill(torch.ones(width, width).triu(1).bool(), float("-inf"))
        decoder.step(ids, StepInputs(0, positions, causal[None].expand(b, width, width)), cache)
        static = KVCache(m.config, len(decoder.layers), b, max_len, torch.float32, tp=decoder.tp)
        for src, dst in zip(cache.tensors(), static.tensors(), strict=True):
            dst.copy_(src)
            dst.narrow(-2 if dst.dim() == 4 else 1, width, max_len - width).normal_()  # stale, masked values
        new = torch.tensor([[17], [23], [29]])
        pos = torch.full((b, 1), width)
        sliced = decoder.step(new, StepInputs(width, pos, torch.zeros(b, 1, width + 1)), cache)
        key_bias = torch.full((b, max_len), float("-inf"))
        key_bias[:, : width + 1] = 0.0
        step = StepInputs(0, pos, key_bias[:, None], slots=torch.tensor([width]))
        full = decoder.step(new, step, static)
    torch.testing.assert_close(full, sliced, atol=1e-5, rtol=1e-5, msg=name)
    for a, s in zip(cache.tensors(), static.tensors(), strict=True):
        dim = -2 if a.dim() == 4 else 1
        torch.testing.assert_close(s.narrow(dim, 0, width + 1), a.narrow(dim, 0, width + 1), atol=1e-5, rtol=1e-5)


class _EagerGraph:
    """Stands in for a captured graph on the CPU: replaying runs the static step eagerly."""

    def __init__(self, graphed: GraphedDecoder, batch: int, keys: int) -> None:
        self.graphed, self.batch, self.keys = graphed, batch, keys

    def replay(self) -> None:
        self.graphed.eager_step(self.batch, self.keys)


@pytest.fixture
def cpu_graphs(monkeypatch):
    """Let the engine take its graph path on the CPU, with the eager stand-in for captures."""
    captured: list[tuple[int, int]] = []

    def capture(self: GraphedDecoder, batch: int, keys: int) -> _EagerGraph:
        captured.append((batch, keys))
        return _EagerGraph(self, batch, keys)

    monkeypatch.setattr(engine_module, "graph_refusal", lambda *args: None)
    monkeypatch.setattr(GraphedDecoder, "_capture", capture)
    return captured


def _training_logprobs(m, prompt, completion, temperature):
    with torch.no_grad():
        logits = forward_logits(m.eval(), torch.tensor([prompt + completion]))[0].float()  # (s, V)
    logp = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 : -1]
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_graph_layout_gives_the_eager_results(model, cpu_graphs):
    """Padding rows (6 prompts in a bucket of 8), rows finishing early (in-place compaction to smaller
    buckets) and growing length buckets leave every row's greedy tokens and log-probabilities unchanged.

    Sampled tokens differ from the eager layout's (the random draws depend on when rows are dropped), so
    sampling is checked against the training forward's log-probabilities and for reproducibility."""
    name, m = model
    eager = RolloutEngine([m], seed=5, cuda_graphs=False)
    graphed = RolloutEngine([m], seed=5)
    assert graphed.cuda_graphs and not eager.cuda_graphs
    free = eager.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=140))
    picks = {o.token_ids[k] for o, k in zip(free[1:], (2, 5, 9, 30, 70), strict=True)}
    stop = tuple(picks - set(free[0].token_ids))  # row 0 runs the full length: later length buckets run
    assert len(stop) >= 2, (name, picks)
    params = SamplingParams(temperature=0, max_new_tokens=140, stop_token_ids=stop)
    want, got = eager.generate(PROMPTS, params), graphed.generate(PROMPTS, params)
    for w, g in zip(want, got, strict=True):
        assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason, name
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4), name
    assert graphed.stats.extra["cuda_graphs"]
    batches = {b for b, _ in cpu_graphs}
    assert 8 in batches and len(batches) > 1, cpu_graphs  # padded bucket, then smaller buckets
    assert {k for _, k in cpu_graphs} >= {128, 256}, cpu_graphs  # length buckets grow with the slot

    sampled = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=24, seed=3, stop_token_ids=stop)
    outs = graphed.generate(PROMPTS, sampled)
    assert [o.token_ids for o in outs] == [o.token_ids for o in graphed.generate(PROMPTS, sampled)]
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref = _training_logprobs(m, prompt, out.token_ids, sampled.temperature)
        assert (ref - torch.tensor(out.logprobs)).abs().max() < 1e-4, name


def test_graph_cache_is_reused_and_grown(cpu_graphs):
    cfg = compose_config(["model=qwen2_tiny"])
    with single_process(cfg):
        engine = RolloutEngine(build_model(cfg))
        params = SamplingParams(temperature=0, max_new_tokens=8)
        engine.generate(PROMPTS[:3], params)
        first = engine._graphed
        assert (first.batch, first.length) == (4, 128)
        engine.generate(PROMPTS[:2], params)
        assert engine._graphed is first and len(cpu_graphs) == 2  # batch 4 and 2, length 128: no recapture
        engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=200))
        assert (engine._graphed.batch, engine._graphed.length) == (8, 256)
        engine.release()
        assert engine._graphed is None


def test_graphs_are_refused_with_a_reason(monkeypatch):
    """MoE layers are captured only where the decoder runs their experts as grouped matmuls (bf16 on Hopper or
    later: nothing sized on the host); fp32 on CUDA, an older GPU or the dispatcher's path are refused."""
    cfg = compose_config(["model=dsv3_tiny"])
    with single_process(cfg):
        m = build_model(cfg)[0]
        layers = list(m.decoder.layers)
        cuda = torch.device("cuda", 0)
        assert "CUDA device" in graph_refusal(layers, torch.device("cpu"), 1)
        assert "MoE" in graph_refusal(layers, cuda, 1)  # fp32 experts: sized on the host
        with pytest.raises(ValueError, match="cuda_graphs=True cannot be honoured"):
            RolloutEngine([m], cuda_graphs=True)
        assert not RolloutEngine([m]).cuda_graphs
        m = m.bfloat16()
        for capability, refused in (((9, 0), False), ((8, 0), True)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
            assert (graph_refusal(layers, cuda, 1) is not None) == refused, capability
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        assert graph_refusal(layers, cuda, 1) is None
        monkeypatch.setattr(m.config, "moe_expert_capacity_factor", 1.0)  # dropped tokens: fewer than top-k experts
        assert "MoE" in graph_refusal(layers, cuda, 1)
        assert "one process" in graph_refusal(layers, cuda, 2)


def test_in_place_compaction_and_narrow_views():
    cache = KVCache(transformer_config(compose_config(["model=qwen2_tiny"])), 2, 4, 8, torch.float32)
    for t in cache.tensors():
        t.copy_(torch.arange(4.0).view(4, 1, 1, 1).expand_as(t))
    storage = [t.data_ptr() for t in cache.tensors()]
    cache.compact_(torch.tensor([1, 3]))
    assert [t.data_ptr() for t in cache.tensors()] == storage
    view = cache.narrow(2)
    assert view.batch == 2 and all(t[:, 0, 0, 0].tolist() == [1.0, 3.0] for t in view.tensors())
    view.keys[0][0].fill_(9.0)
    assert cache.keys[0][0].eq(9.0).all()


def test_a_failed_capture_falls_back_to_eager_mid_call(monkeypatch, caplog):
    """A capture that raises (here the second one, after rows have been dropped) turns graphs off with a
    logged reason; the call finishes eagerly on the same cache with the eager engine's tokens."""
    calls = []

    def capture(self: GraphedDecoder, batch: int, keys: int) -> _EagerGraph:
        calls.append((batch, keys))
        if len(calls) > 1:
            raise RuntimeError("operation not permitted when stream is capturing")
        return _EagerGraph(self, batch, keys)

    monkeypatch.setattr(engine_module, "graph_refusal", lambda *args: None)
    monkeypatch.setattr(GraphedDecoder, "_capture", capture)
    cfg = compose_config(["model=qwen2_tiny", "model.init_method_std=0.2"])
    with single_process(cfg):
        torch.manual_seed(0)
        m = build_model(cfg)[0].eval()
        eager, graphed = RolloutEngine([m], cuda_graphs=False), RolloutEngine([m])
        free = eager.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=20))
        stop = tuple({free[1].token_ids[2], free[3].token_ids[4]} - set(free[0].token_ids))
        params = SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=stop)
        with caplog.at_level("WARNING", logger="r1mega"):
            got = graphed.generate(PROMPTS, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in eager.generate(PROMPTS, params)]
        assert not graphed.cuda_graphs and graphed._graphed is None and len(calls) == 2
        assert "CUDA graph capture failed" in caplog.text


def test_the_graph_loop_queues_each_forward_before_reading_its_tokens(cpu_graphs, monkeypatch):
    """The graph layout's loop runs a step ahead of the host: step t's forward is queued before the host reads
    step t's tokens (so on a GPU the forward runs while the host records them), and its sampler never reads
    the device (``sync_free``). The last step, whose tokens end every row, queues no forward."""
    events: list[str] = []
    step, read, sample = RolloutEngine._step, RolloutEngine._read_host, RolloutEngine._sample

    def log_step(self, batch, decoder, t, width, max_len):
        events.append(f"step{t}")
        return step(self, batch, decoder, t, width, max_len)

    def log_read(host, done=None):
        events.append("read")
        return read(host, done)

    def log_sample(self, logits, params, sync_free=False):
        events.append("sample" if sync_free else "sample(sync)")
        return sample(self, logits, params, sync_free)

    monkeypatch.setattr(RolloutEngine, "_step", log_step)
    monkeypatch.setattr(RolloutEngine, "_read_host", staticmethod(log_read))
    monkeypatch.setattr(RolloutEngine, "_sample", log_sample)
    cfg = compose_config(["model=qwen2_tiny"])
    with single_process(cfg):
        engine = RolloutEngine(build_model(cfg))
        out = engine.generate(PROMPTS[:3], SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=4))
    assert [len(o.token_ids) for o in out] == [4, 4, 4]
    assert events == ["sample", "step0", "read", "sample", "step1", "read", "sample", "step2", "read", "sample", "read"]
