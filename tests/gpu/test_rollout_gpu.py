"""The rollout engine on one CUDA device, mirroring the CPU golden rollout tests (skipped without CUDA).

Cached greedy decoding equals full recomputation; the engine's log-probabilities equal a training forward's
(fp32, and bf16 at the CPU test's tolerance); the CUDA-graph decode step gives the eager step's greedy
tokens, also while rows finish early; and the engine's tensors and sampler live on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from r1mega.config.load import compose_config
from r1mega.models.builder import build_model
from r1mega.models.forward import forward_logits
from r1mega.parallel.bootstrap import single_process
from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [100, 200, 300, 400, 500, 600, 700], [42], [7, 7, 7, 9]]
FP32_TOL = 1e-4


@pytest.fixture(params=["qwen2_tiny", "llama_tiny", "dsv3_tiny"])
def model(request):
    cfg = compose_config([f"model={request.param}", "model.init_method_std=0.2", "precision=fp32"])
    with single_process(cfg):
        torch.manual_seed(0)
        m = build_model(cfg)[0].eval()
        assert next(m.parameters()).is_cuda
        yield request.param, m


def _device(m: torch.nn.Module) -> torch.device:
    return next(m.parameters()).device


def _recompute_greedy(m, prompt, steps):
    seq = torch.tensor([prompt], device=_device(m))
    with torch.no_grad():
        for _ in range(steps):
            nxt = forward_logits(m, seq)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[0, len(prompt) :].tolist()


def _training_logprobs(m, prompt, completion, temperature):
    with torch.no_grad():
        logits = forward_logits(m, torch.tensor([prompt + completion], device=_device(m)))[0].float()  # (s, V)
    logp = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 : -1]
    return logp.gather(-1, torch.tensor(completion, device=logits.device)[:, None]).squeeze(-1).cpu()


def test_cached_greedy_equals_full_recomputation_on_cuda(model):
    name, m = model
    for graphs in (False, None):  # eager, then the default (CUDA graphs for the dense models)
        engine = RolloutEngine([m], cuda_graphs=graphs)
        outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
        for prompt, out in zip(PROMPTS, outs, strict=True):
            assert out.token_ids == _recompute_greedy(m, prompt, 12), (name, graphs)
        assert engine.stats.extra["cuda_graphs"] == (graphs is None and name != "dsv3_tiny"), name


def test_logprobs_equal_the_training_forward_on_cuda(model):
    name, m = model
    engine = RolloutEngine([m])
    assert engine.generator.device.type == "cuda"
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=16, seed=3)
    outs = engine.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        diff = (_training_logprobs(m, prompt, out.token_ids, 0.6) - torch.tensor(out.logprobs)).abs().max().item()
        assert diff < FP32_TOL, (name, diff)
    state = engine.state_dict()
    params.seed = None
    first = [o.token_ids for o in engine.generate(PROMPTS, params)]
    engine.load_state_dict(state)
    assert first == [o.token_ids for o in engine.generate(PROMPTS, params)]


@pytest.mark.parametrize("name", ["qwen2_tiny", "dsv3_tiny"])
def test_bf16_logprob_mismatch_is_small_on_cuda(name):
    """The CPU test's bound on the bf16 train/inference mismatch holds on the GPU (with graphs for Qwen2)."""
    cfg = compose_config([f"model={name}", "precision=bf16", "precision.transformer_impl=local"])
    with single_process(cfg):
        torch.manual_seed(0)
        m = build_model(cfg)[0].eval()
        assert next(m.parameters()).dtype == torch.bfloat16 and next(m.parameters()).is_cuda
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=32, seed=5)
        outs = RolloutEngine([m]).generate(PROMPTS, params)
        diffs = torch.cat(
            [
                (_training_logprobs(m, p, o.token_ids, 1.0) - torch.tensor(o.logprobs)).abs()
                for p, o in zip(PROMPTS, outs, strict=True)
            ]
        )
        assert diffs.mean() < 2e-3 and diffs.max() < 2e-2, (diffs.mean(), diffs.max())


@pytest.mark.parametrize("name", ["qwen2_tiny", "llama_tiny"])
def test_cuda_graphs_give_the_eager_greedy_tokens(name):
    """Captured steps over padded batch buckets, in-place compaction as rows stop, and length buckets past
    128 slots: the same greedy tokens as the eager engine, and no recapture on a second call."""
    cfg = compose_config([f"model={name}", "model.init_method_std=0.2", "precision=fp32"])
    with single_process(cfg):
        torch.manual_seed(0)
        m = build_model(cfg)[0].eval()
        eager, graphed = RolloutEngine([m], cuda_graphs=False), RolloutEngine([m], cuda_graphs=True)
        free = eager.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=150))
        picks = {o.token_ids[k] for o, k in zip(free[1:], (3, 8, 20, 60), strict=True)}
        stop = tuple(picks - set(free[0].token_ids))
        params = SamplingParams(temperature=0, max_new_tokens=150, stop_token_ids=stop)
        want = eager.generate(PROMPTS, params)
        for _ in range(2):
            got = graphed.generate(PROMPTS, params)
            assert graphed.cuda_graphs, "capture failed: see the logged warning"
            for w, g in zip(want, got, strict=True):
                assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
                assert g.logprobs == pytest.approx(w.logprobs, abs=FP32_TOL)
        captured = graphed.stats.extra["graphs_captured"]
        assert captured >= 2, captured
        graphed.generate(PROMPTS, params)
        assert len(graphed._graphed.graphs) == captured  # reused, not recaptured
        graphed.release()


def test_moe_decode_steps_are_captured_in_bf16():
    """MoE+MLA in bf16 on Hopper: the decoder runs the experts as grouped matmuls (nothing sized on the host), so
    its decode steps are captured (each capture's replay is checked against the eager static step), and decode
    the eager engine's greedy tokens. The eager engine attends to the written slots only and a graph to a
    128-slot bucket under a mask: the same maths, other bf16 GEMM shapes, so a near tie may still flip; 90% of
    the tokens before each row's first difference must agree."""
    cfg = compose_config(["model=dsv3_tiny", "model.init_method_std=0.2", "precision=bf16"])
    with single_process(cfg):
        torch.manual_seed(0)
        m = build_model(cfg)[0].eval()
        params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
        want = RolloutEngine([m], cuda_graphs=False).generate(PROMPTS, params)
        graphed = RolloutEngine([m], cuda_graphs=True)
        got = graphed.generate(PROMPTS, params)
        assert graphed.cuda_graphs and graphed.stats.extra["graphs_captured"] >= 1, "capture failed: see the log"
        same = 0
        for w, g in zip(want, got, strict=True):
            pairs = enumerate(zip(w.token_ids, g.token_ids, strict=True))  # 40 tokens each (ignore_eos)
            same += next((i for i, (a, b) in pairs if a != b), len(w.token_ids))
        assert same >= 0.9 * sum(len(w.token_ids) for w in want), same


@pytest.mark.parametrize("name", ["qwen2_tiny", "dsv3_tiny"])
def test_the_graph_decode_loop_never_waits_for_the_device_implicitly(name, monkeypatch):
    """Once its graphs are captured, the decode loop's only waits are the reads of each step's tokens (an event
    behind which the next forward is already queued): no ``.item()``, ``.cpu()``, ``nonzero`` or pageable copy,
    which would stall the host until the device drains. Checked with torch's sync debug mode set to raise,
    sampling at T=0.6, top-p 0.95 with rows stopping early (compaction to smaller buckets); the MoE model's
    experts as grouped matmuls."""
    from r1mega.rollout import engine as engine_module

    cfg = compose_config([f"model={name}", "model.init_method_std=0.2", "precision=bf16"])
    with single_process(cfg):
        torch.manual_seed(0)
        m = build_model(cfg)[0].eval()
        engine = RolloutEngine([m], cuda_graphs=True)
        prompts = PROMPTS * 4
        stop = tuple(range(20, 60))  # ~2% of the vocabulary per step: rows stop at different steps
        params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=96, stop_token_ids=stop, seed=1)
        engine.generate(prompts, params)  # captures the graphs
        captured = len(engine._graphed.graphs)
        decode = engine_module.RolloutEngine._decode_ahead

        def checked(self, *args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return decode(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        monkeypatch.setattr(engine_module.RolloutEngine, "_decode_ahead", checked)
        out = engine.generate(prompts, params)
        assert engine.cuda_graphs and len(engine._graphed.graphs) == captured
        lengths = [len(o.token_ids) for o in out]
        assert min(lengths) < max(lengths), lengths  # rows stopped at different steps
