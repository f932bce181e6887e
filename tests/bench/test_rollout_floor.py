"""The floors of ``bench/rollout_floor.py`` count the products a decode step and a prefill really do."""

from __future__ import annotations

import sys

import pytest
import torch
from bench_utils import BENCH_DIR

from r1mega.config.load import compose_config
from r1mega.models.builder import build_model
from r1mega.parallel.bootstrap import single_process

sys.path.insert(0, str(BENCH_DIR))
from rollout_floor import (  # noqa: E402
    AttentionFloor,
    MatmulFloor,
    PrefillFloor,
    StepFloor,
    mean_attended,
    named_decode_matmuls,
    routed_weight,
)


@pytest.mark.parametrize("name", ["qwen2_tiny", "llama_tiny", "dsv3_tiny", "dsv3_tiny-grouped"])
def test_decode_and_prefill_matmuls(name: str) -> None:
    """A decode step multiplies every weight matrix of the main model (the output layer: the tied embedding or its
    own) by ``batch`` rows, a routed expert's by its mean share (grouped experts: each expert's block of the
    stacked weights); a prefill every weight by the prompt tokens and the output layer by the prompts' last
    positions only. The MTP module is not part of either."""
    name, _, grouped = name.partition("-")
    overrides = [f"model={name}", "model.mtp_num_layers=0"] if name == "dsv3_tiny" else [f"model={name}"]
    cfg = compose_config([*overrides, "model.moe_experts=grouped"] if grouped else overrides)
    with single_process(cfg):
        model = build_model(cfg)[0]
        params = {n: p for n, p in model.named_parameters() if p.dim() == 2}
        head = "output_layer.weight" if "output_layer.weight" in params else "embedding.word_embeddings.weight"
        experts, top_k = model.config.num_moe_experts or 1, model.config.moe_router_topk
        decode, prefill = named_decode_matmuls(model, 8), named_decode_matmuls(model, 40, head_rows=2)
        names = [n for n, _, _ in decode]
        assert names == [n for n, _, _ in prefill] and len(set(names)) == len(names)
        assert head in names
        if head == "output_layer.weight":
            assert "embedding.word_embeddings.weight" not in names  # a lookup, not a matmul
        for (n, n_decode, w), (_, n_prefill, _) in zip(decode, prefill, strict=True):
            if n == head:
                assert (n_decode, n_prefill) == (8, 2)
            elif routed_weight(n):
                assert (n_decode, n_prefill) == (round(8 * top_k / experts), round(40 * top_k / experts))
            else:
                assert (n_decode, n_prefill) == (8, 40)
            if n in params:
                assert w is params[n]
        assert any(routed_weight(n) for n in names) == (name == "dsv3_tiny")
        if grouped:  # each expert's block of the stacked weights, as the layer multiplies it
            assert not any(".local_experts." in n for n in names)
            layer = model.decoder.layers[1].mlp.experts
            w1 = dict((n, w) for n, _, w in decode)["decoder.layers.1.mlp.experts.weight1.5"]
            assert torch.equal(w1.t(), layer.weight1.view(8, model.config.hidden_size, -1)[5])
            assert sum(routed_weight(n) for n in names) == 2 * 8 * 3  # fc1 and fc2 of 8 experts in 3 MoE layers
        assert routed_weight("x.experts.weight1.0") and not routed_weight("x.experts.linear_fc1.weight")
        assert sum(w.numel() for _, _, w in decode) == sum(
            p.numel()
            for n, p in params.items()
            if not n.startswith("mtp.") and (n != "embedding.word_embeddings.weight" or head == n)
        )

        floor = PrefillFloor(model, [5, 7, 9], batch=2)  # two prefills: 12 tokens of 2 prompts, 9 tokens of 1
        assert [(f.batch, len(f.pairs)) for f in floor.floors] == [(12, len(decode)), (9, len(decode))]
        assert floor.time() > 0 and floor.median > 0


@pytest.mark.parametrize("name", ["qwen2_tiny", "dsv3_tiny"])
def test_attention_floor_multiplies_what_the_decoder_does(name: str) -> None:
    """Per layer, the scores and the context against the cache tensors the engine allocates, at each attended
    length: the same shapes and products as ``CachedDecoder._gqa`` / ``_mla`` (absorbed) on one token per row."""
    cfg = compose_config([f"model={name}", "model.mtp_num_layers=0"] if name == "dsv3_tiny" else [f"model={name}"])
    with single_process(cfg):
        model = build_model(cfg)[0]
        c = model.config
        floor = AttentionFloor(model, batch=3, short=5, long=11, steps=1)
        for n in (5, 11):
            products = floor.products[n]
            assert len(products) == 2 * c.num_layers
            for (q, keys), (p, values) in zip(products[::2], products[1::2], strict=True):
                if name == "dsv3_tiny":  # the latent cache: (b, S, r + dr)
                    width = c.kv_lora_rank + c.qk_pos_emb_head_dim
                    assert q.shape == (3, c.num_attention_heads, width) and keys.shape == (3, width, n)
                    assert p.shape == (3, c.num_attention_heads, n) and values.shape == (3, n, c.kv_lora_rank)
                else:  # K and V: (b, groups, S, d)
                    g, d = c.num_query_groups, c.kv_channels
                    assert q.shape == (3, g, c.num_attention_heads // g, d) and keys.shape == (3, g, d, n)
                    assert p.shape == (3, g, c.num_attention_heads // g, n) and values.shape == (3, g, n, d)
                assert keys.data_ptr() != values.data_ptr() or name == "dsv3_tiny"
        ptrs = {keys.untyped_storage().data_ptr() for _, keys in floor.products[11][::2]}
        assert len(ptrs) == c.num_layers  # one cache tensor per layer, read from memory as the engine's
        floor.time()
        assert floor.at(5) > 0 and floor.at(11) > 0
        per_position = (floor.at(11) - floor.at(5)) / 6
        assert floor.at(8) == pytest.approx(floor.at(5) + 3 * per_position)
        assert floor.bytes_per_position == 3 * c.num_layers * _values_per_token(c) * 4


def _values_per_token(c) -> int:
    if getattr(c, "kv_lora_rank", None):
        return c.kv_lora_rank + c.qk_pos_emb_head_dim
    return 2 * c.num_query_groups * c.kv_channels


def test_attention_floor_lengths_and_mean_attended() -> None:
    with pytest.raises(ValueError, match="0 < short < long"):
        AttentionFloor(None, 1, 8, 8)  # type: ignore[arg-type]
    # a response of n tokens after a prompt of p attends p + 1, ..., p + n
    assert mean_attended([10], [1]) == 11
    assert mean_attended([10, 4], [3, 0]) == (11 + 12 + 13) / 3
    assert mean_attended([10, 20], [2, 2]) == (11 + 12 + 21 + 22) / 4
    assert mean_attended([7], [0]) == 0.0


@pytest.mark.parametrize("name", ["qwen2_tiny", "dsv3_tiny"])
def test_step_floor_runs_a_steps_products_in_its_order(name: str) -> None:
    """Every product of the matmul floor and of the attention floor, once each: per layer its attention's input
    projections, its two attention products, then its output projection and MLP; the output layer last."""
    cfg = compose_config([f"model={name}", "model.mtp_num_layers=0"] if name == "dsv3_tiny" else [f"model={name}"])
    with single_process(cfg):
        model = build_model(cfg)[0]
        weights = MatmulFloor(model, 4, steps=1)
        attention = AttentionFloor(model, 4, 3, 9, steps=1)
        step = StepFloor(weights, attention)
        name_of = {id(w): n for n, w in zip(weights.names, (w for _, w in weights.pairs), strict=True)}
        for n in (3, 9):
            seq = step.products[n]
            assert sorted(map(id, (b for _, b in seq))) == sorted(
                [id(w) for _, w in weights.pairs] + [id(b) for _, b in attention.products[n]]
            )
            labels = [name_of.get(id(b), "attention") for _, b in seq]
            assert labels[-1] in ("output_layer.weight", "embedding.word_embeddings.weight")
            for layer in range(model.config.num_layers):
                mine = [i for i, label in enumerate(labels) if label.startswith(f"decoder.layers.{layer}.")]
                att = [i for i in range(mine[0], mine[-1]) if labels[i] == "attention"]
                assert len(att) == 2 and att[1] == att[0] + 1  # scores, then context
                for i in mine:
                    inputs = ".self_attention." in labels[i] and ".linear_proj." not in labels[i]
                    assert (i < att[0]) == inputs, labels[i]
        step.time()
        assert step.at(3) > 0 and step.at(9) > 0 and step.at(6) == pytest.approx((step.at(3) + step.at(9)) / 2)
