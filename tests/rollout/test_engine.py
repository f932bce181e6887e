"""The rollout engine on one process: cached decoding equals full recomputation, log-probabilities equal
the training forward's, and the sampling controls (stop strings/tokens, EOS, prefix, seeds) behave."""

import pytest
import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from r1mega.config.load import compose_config
from r1mega.data.tokenizer import train_tokenizer
from r1mega.models.builder import build_model, transformer_config
from r1mega.models.forward import forward_logits
from r1mega.models.grouped_experts import TorchGroupedMLP
from r1mega.parallel.bootstrap import single_process
from r1mega.rollout.decode import CachedDecoder
from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.kv_cache import CacheLayout
from r1mega.rollout.pipelined import split_rows
from r1mega.rollout.sampling import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [100, 200, 300, 400, 500, 600, 700], [42]]
FP32_TOL = 1e-4
"""Max |engine logprob - training-forward logprob| in fp32 (absorbed MLA reorders the sums)."""


@pytest.fixture(params=["qwen2_tiny", "llama_tiny", "dsv3_tiny"])
def model(request):
    # A wide init gives varied greedy tokens (a 0.02 init mostly repeats the last prompt token).
    cfg = compose_config([f"model={request.param}", "model.init_method_std=0.2"])
    with single_process(cfg):
        torch.manual_seed(0)
        chunks = build_model(cfg)
        yield request.param, chunks[0]


def _recompute_greedy(model, prompt, steps):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(forward_logits(model.eval(), torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def _training_logprobs(model, prompt, completion, temperature):
    with torch.no_grad():
        logits = forward_logits(model.eval(), torch.tensor([prompt + completion]))[0].float()  # (s, V)
    logp = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 : -1]
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_cached_greedy_equals_full_recomputation(model):
    name, m = model
    outs = RolloutEngine([m]).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == _recompute_greedy(m, prompt, 12), name
        assert out.finish_reason == "length"
    assert len({tuple(o.token_ids) for o in outs}) == len(PROMPTS)


def test_row_groups_decode_what_one_batch_decodes(model):
    """Row groups (decoded in turn on one process: what a pipelined run is compared against) give one batch's
    greedy tokens, with stops ending rows in some groups earlier than in others; stats count every group."""
    name, m = model
    params = SamplingParams(temperature=0, max_new_tokens=12)
    one = RolloutEngine([m]).generate(PROMPTS, params)
    stop = {o.token_ids[4] for o in one[1:2]}  # the second prompt stops after 5 tokens, the others run on
    for groups in (2, 3, 4, 9):
        engine = RolloutEngine([m], row_groups=groups)
        outs = engine.generate(PROMPTS, params)
        assert [o.token_ids for o in outs] == [o.token_ids for o in one], (name, groups)
        for a, b in zip(outs, one, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert engine.stats.extra["row_groups"] == min(groups, len(PROMPTS))
        assert engine.stats.generated_tokens == 12 * len(PROMPTS) and engine.stats.steps == 12
        stopped = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=stop))
        ref = RolloutEngine([m]).generate(
            PROMPTS, SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=stop)
        )
        assert [(o.token_ids, o.finish_reason) for o in stopped] == [(o.token_ids, o.finish_reason) for o in ref]
    with pytest.raises(ValueError, match="row_groups=0"):
        RolloutEngine([m], row_groups=0)


def test_split_rows_is_contiguous_and_even():
    assert split_rows(5, 2) == [range(0, 3), range(3, 5)]
    assert split_rows(2, 4) == [range(0, 1), range(1, 2)]
    assert [len(r) for r in split_rows(10, 4)] == [3, 3, 2, 2]


def test_logprobs_equal_the_training_forward(model):
    name, m = model
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=16, seed=3)
    outs = RolloutEngine([m]).generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref = _training_logprobs(m, prompt, out.token_ids, params.temperature)
        diff = (ref - torch.tensor(out.logprobs)).abs().max().item()
        assert diff < FP32_TOL, (name, diff)


def test_batch_composition_does_not_change_results(model):
    """Rows finishing early (and the batch compaction that follows) leave the other rows' tokens unchanged."""
    _, m = model
    engine = RolloutEngine([m])
    alone = [engine.generate([p], SamplingParams(temperature=0, max_new_tokens=10))[0] for p in PROMPTS]
    stop = alone[1].token_ids[2]  # a token that ends prompt 1 after three tokens
    together = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=(stop,)))
    assert together[1].finish_reason == "stop" and together[1].token_ids == alone[1].token_ids[:3]
    for a, t in zip(alone, together, strict=True):
        cut = a.token_ids.index(stop) + 1 if stop in a.token_ids else len(a.token_ids)
        assert t.token_ids == a.token_ids[:cut]
        assert t.logprobs == pytest.approx(a.logprobs[:cut], abs=FP32_TOL)


def test_seeds_reproduce_and_differ(model):
    _, m = model
    engine = RolloutEngine([m])
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=11)
    first = [o.token_ids for o in engine.generate(PROMPTS, params)]
    assert first == [o.token_ids for o in engine.generate(PROMPTS, params)]
    params.seed = 12
    assert first != [o.token_ids for o in engine.generate(PROMPTS, params)]
    state = engine.state_dict()
    params.seed = None
    a = [o.token_ids for o in engine.generate(PROMPTS, params)]
    engine.load_state_dict(state)
    assert a == [o.token_ids for o in engine.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = [
        f"<think>\nstep {i}: {i} plus {i} is {2 * i}.\n</think>\n\nThe answer is \\boxed{{{2 * i}}}."
        for i in range(300)
    ]
    return train_tokenizer(corpus, vocab_size=400, out_dir=str(tmp_path_factory.mktemp("tok")))


def test_text_prefix_stop_strings_and_eos(tokenizer):
    cfg = compose_config(["model=qwen2_tiny", "model.init_method_std=0.2"])
    with single_process(cfg):
        torch.manual_seed(0)
        engine = RolloutEngine(build_model(cfg), tokenizer=tokenizer, vocab_size=len(tokenizer))
        prompts = engine.encode(["What is 2 plus 2?", "Add 3 and 4."], prefix="<think>\n")
        assert prompts[0][-2:] == tokenizer.encode("<think>\n", add_special_tokens=False)[-2:]
        free = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24))
        assert all(max(o.token_ids) < len(tokenizer) for o in free)  # padded vocab is never sampled
        # A stop string taken from the free-running text: generation ends there, the text is cut before it.
        text = free[0].text
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        cut = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24, stop=(stop,)))
        assert cut[0].finish_reason == "stop" and cut[0].text == text[: text.find(stop)]
        assert len(cut[0].token_ids) < len(free[0].token_ids)
        # EOS: make the first free-running token the end-of-sequence token.
        engine.eos_token_ids = (free[1].token_ids[0],)
        eos = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24))
        assert eos[1].finish_reason == "eos" and eos[1].token_ids == free[1].token_ids[:1] and eos[1].text == ""
        ignored = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True))
        assert ignored[1].token_ids == free[1].token_ids


@pytest.mark.parametrize("name", ["qwen2_tiny", "dsv3_tiny"])
def test_bf16_logprob_mismatch_is_small(name):
    """bf16 rollout vs bf16 training forward: the train/inference mismatch GRPO fights, measured.

    Measured here (32 tokens x 4 prompts, T=1): mean 4e-4 / max 2e-3 (Qwen2) and 6e-4 / 5e-3 (MLA+MoE);
    fp32 gives 1e-7 / 5e-7. With sharp logits (init std 0.2) the MoE model reaches max 2.0 where bf16
    rounding flips a router's top-k choice: the routing mismatch MoE RL frameworks replay routes for.
    """
    cfg = compose_config([f"model={name}", "precision=bf16"])
    with single_process(cfg):
        torch.manual_seed(0)
        m = build_model(cfg)[0]
        assert next(m.parameters()).dtype == torch.bfloat16
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=32, seed=5)
        outs = RolloutEngine([m]).generate(PROMPTS, params)
        diffs = torch.cat(
            [
                (_training_logprobs(m, p, o.token_ids, 1.0) - torch.tensor(o.logprobs)).abs()
                for p, o in zip(PROMPTS, outs, strict=True)
            ]
        )
        assert diffs.mean() < 2e-3 and diffs.max() < 2e-2, (diffs.mean(), diffs.max())


def test_latent_cache_size():
    """MLA caches kv_lora_rank + rope dim per token and layer: 576 values for DeepSeek-V3 vs 32,768 for MHA."""
    dsv3 = CacheLayout.of(transformer_config(compose_config(["model=deepseek_v3"])))
    assert (dsv3.latent, dsv3.values_per_token, dsv3.mha_values_per_token) == (True, 576, 32768)
    qwen = CacheLayout.of(transformer_config(compose_config(["model=qwen2_5_7b"])))
    assert (qwen.latent, qwen.values_per_token, qwen.mha_values_per_token) == (False, 2 * 4 * 128, 2 * 28 * 128)
    cfg = compose_config(["model=dsv3_tiny"])
    with single_process(cfg):
        engine = RolloutEngine(build_model(cfg))
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=4))
        assert engine.stats.cache_bytes_per_token == 4 * (32 + 8) * 4  # layers * (r + dr) * fp32 bytes


def test_pipeline_stage_needs_its_pipeline_group():
    cfg = compose_config(["model=qwen2_tiny"])
    with single_process(cfg):
        m = build_model(cfg)[0]
        m.post_process = False
        with pytest.raises(ValueError, match="pass the pipeline group"):
            RolloutEngine([m]).generate(PROMPTS, SamplingParams(max_new_tokens=2))


FP8_SHAPES = {  # every width a multiple of 128 where FP8 blocks need it, so the FP8 layers really run FP8
    "qwen2_tiny": ["model.hidden_size=128", "model.ffn_hidden_size=256"],
    "llama_tiny": ["model.hidden_size=128", "model.ffn_hidden_size=256"],
    "dsv3_tiny": ["model.hidden_size=128", "model.ffn_hidden_size=256", "model.moe_ffn_hidden_size=128",
                  "model.moe_shared_expert_intermediate_size=128", "model.q_lora_rank=128", "model.kv_lora_rank=128",
                  "model.qk_head_dim=32", "model.qk_pos_emb_head_dim=32", "model.v_head_dim=32"],
}  # fmt: skip
SPECS = {"local": ["precision=fp32"], "local-fp8": ["precision=fp8", "precision.fp8_backend=torch"]}


@pytest.mark.parametrize("spec", sorted(SPECS))
@pytest.mark.parametrize("name", sorted(FP8_SHAPES))
def test_decode_computes_what_the_spec_built_model_computes(name, spec):
    """The cached decoder re-implements the forward pass, so it is checked against the model each layer spec
    builds, for every family: local layers, and FP8 local layers (DeepSeek-V3's blockwise recipe, emulated on
    the CPU), whose GEMMs (and MLA's absorbed up-projection) must see the same quantised operands.

    Activations run in fp32 here: FP8 rounding amplifies bf16 noise from reordered sums (bf16 with identical
    GEMMs: mean 3.5e-3). Even fp32's last-bit differences (decode and the training forward multiply matrices of
    other shapes) now and then move a value across an FP8 rounding boundary; the flipped value stays in the cache
    and shifts that sequence's later log-probabilities by ~1e-3 (seen for MLA+MoE on an Intel CPU with AVX-512:
    8 of 64 tokens, mean 1.1e-4; 0 of 64 on AMD). So FP8 is held to most tokens exact (median) and a small mean,
    where a decoder that ignored FP8 differs at every token (measured: median 5e-3 to 9e-3, mean 6e-3 to 1.1e-2).
    """
    from r1mega.models.fp8 import is_fp8_layer

    cfg = compose_config([f"model={name}", *FP8_SHAPES[name], *SPECS[spec]])
    with single_process(cfg):
        torch.manual_seed(0)
        m = build_model(cfg)[0].float()
        fp8_layers = sum(is_fp8_layer(module) for module in m.modules())
        assert (fp8_layers > 0) == (spec == "local-fp8"), fp8_layers
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16, seed=5)
        outs = RolloutEngine([m]).generate(PROMPTS, params)
        diffs = torch.cat(
            [
                (_training_logprobs(m, prompt, out.token_ids, 1.0) - torch.tensor(out.logprobs)).abs()
                for prompt, out in zip(PROMPTS, outs, strict=True)
            ]
        )
        if spec == "local-fp8":
            assert diffs.median() < FP32_TOL and diffs.mean() < 1e-3, (name, diffs.median(), diffs.mean())
        else:
            assert diffs.max() < FP32_TOL, (name, spec, diffs.max().item())


@pytest.mark.parametrize(
    ("precision", "sizes", "local"),
    [
        ("fp32", [], True),
        ("bf16", [], True),
        ("fp8", [], True),  # experts too small for FP8 GEMMs (128-multiples): they run in bf16
        ("fp8", ["model.hidden_size=128", "model.moe_ffn_hidden_size=128"], False),
    ],
)
@pytest.mark.parametrize("grouped", [True, False])
def test_moe_layers_without_the_dispatcher_compute_what_megatron_computes(precision, sizes, local, grouped):
    """The decoder's own MoE path (router, then the experts on their tokens: two grouped matmuls over stacked
    weights, or each busy expert in turn where grouped matmuls are not available) gives megatron-core's
    MoELayer output on the same tokens; layers with FP8 expert GEMMs keep megatron's path."""
    cfg = compose_config(["model=dsv3_tiny", "model.init_method_std=0.2", f"precision={precision}", *sizes])
    with single_process(cfg), torch.no_grad():
        torch.manual_seed(0)
        model = build_model(cfg)[0].eval()
        decoder = CachedDecoder(model, 64)
        moe = [layer.mlp for layer in decoder.layers if isinstance(layer.mlp, MoELayer)]
        assert moe
        for mlp in moe:
            assert decoder._local_moe(mlp) == local
            if not grouped:
                decoder._stacked[id(mlp)] = None
            h = torch.randn(3, 5, model.config.hidden_size).to(decoder.dtype)  # (s, b, hidden)
            want = mlp(h)[0]
            assert (decoder._moe(mlp, h) - want).abs().max() <= 1e-6 * want.abs().max()
            assert (decoder._stacked.get(id(mlp)) is not None) == (grouped and local), decoder._stacked


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grouped_experts_decode_from_their_own_weights(precision):
    """With ``model.moe_experts=grouped`` the decoder's MoE path multiplies the layer's stacked parameters
    themselves (views, no copies to refresh) and gives megatron-core's layer output; an in-place update is seen
    by the next ``generate`` as by a new engine."""
    cfg = compose_config(
        ["model=dsv3_tiny", "model.init_method_std=0.2", f"precision={precision}", "model.moe_experts=grouped"]
    )
    with single_process(cfg), torch.no_grad():
        torch.manual_seed(0)
        model = build_model(cfg)[0].eval()
        decoder = CachedDecoder(model, 64)
        moe = [layer.mlp for layer in decoder.layers if isinstance(layer.mlp, MoELayer)]
        assert moe and all(isinstance(mlp.experts, TorchGroupedMLP) for mlp in moe)
        for mlp in moe:
            assert decoder._local_moe(mlp)
            h = torch.randn(3, 5, model.config.hidden_size).to(decoder.dtype)  # (s, b, hidden)
            want = mlp(h)[0]
            assert (decoder._moe(mlp, h) - want).abs().max() <= 1e-6 * want.abs().max()
            w1, w2 = decoder._stacked[id(mlp)]
            assert w1.data_ptr() == mlp.experts.weight1.data_ptr() and w2.data_ptr() == mlp.experts.weight2.data_ptr()
        params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
        engine = RolloutEngine([model])
        before = engine.generate(PROMPTS, params)
        for mlp in moe:
            mlp.experts.weight2.data.mul_(-3.0)
        after = engine.generate(PROMPTS, params)
        assert [o.token_ids for o in after] == [o.token_ids for o in RolloutEngine([model]).generate(PROMPTS, params)]
        assert [o.token_ids for o in after] != [o.token_ids for o in before]


def test_stacked_expert_weights_follow_the_trainer():
    """The grouped MoE path multiplies by copies of the experts' weights: an update made between two
    ``generate`` calls (here in place through ``.data``, which no version counter sees) is copied into them,
    into the same storage (a captured graph reads those addresses), so the engine samples what a new engine
    on the updated weights samples."""
    cfg = compose_config(["model=dsv3_tiny", "model.init_method_std=0.2"])
    with single_process(cfg):
        torch.manual_seed(0)
        model = build_model(cfg)[0].eval()
        params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
        engine = RolloutEngine([model])
        before = engine.generate(PROMPTS, params)
        stacked = [t.data_ptr() for pair in engine._decoder._stacked.values() if pair for t in pair]
        assert stacked  # the MoE layers run grouped on the CPU
        with torch.no_grad():
            for layer in model.decoder.layers:
                if isinstance(layer.mlp, MoELayer):
                    for expert in layer.mlp.experts.local_experts:
                        expert.linear_fc2.weight.data.mul_(-3.0)
        after = engine.generate(PROMPTS, params)
        assert [t.data_ptr() for pair in engine._decoder._stacked.values() if pair for t in pair] == stacked
        assert [o.token_ids for o in after] == [o.token_ids for o in RolloutEngine([model]).generate(PROMPTS, params)]
        assert [o.token_ids for o in after] != [o.token_ids for o in before]
