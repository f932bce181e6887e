"""The matmul floors of ``bench/rollout_floor.py`` count the products a decode step and a prefill really do."""

from __future__ import annotations

import sys

import pytest
from bench_utils import BENCH_DIR

from r1mega.config.load import compose_config
from r1mega.models.builder import build_model
from r1mega.parallel.bootstrap import single_process

sys.path.insert(0, str(BENCH_DIR))
from rollout_floor import PrefillFloor, decode_matmuls  # noqa: E402


@pytest.mark.parametrize("name", ["qwen2_tiny", "llama_tiny", "dsv3_tiny"])
def test_decode_and_prefill_matmuls(name: str) -> None:
    """A decode step multiplies every weight matrix of the main model (the output layer: the tied embedding or its
    own) by ``batch`` rows, a routed expert's by its mean share; a prefill every weight by the prompt tokens and
    the output layer by the prompts' last positions only. The MTP module is not part of either."""
    cfg = compose_config([f"model={name}", "model.mtp_num_layers=0"] if name == "dsv3_tiny" else [f"model={name}"])
    with single_process(cfg):
        model = build_model(cfg)[0]
        weights = {id(p): n for n, p in model.named_parameters() if p.dim() == 2}
        head = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        head = head if head is not None else model.output_layer.weight
        experts, top_k = model.config.num_moe_experts or 1, model.config.moe_router_topk
        decode, prefill = decode_matmuls(model, 8), decode_matmuls(model, 40, head_rows=2)
        assert [id(w) for _, w in decode] == [id(w) for _, w in prefill]
        names = {weights[id(w)] for _, w in decode}
        assert id(head) in {id(w) for _, w in decode} and len(names) == len(decode)
        if not model.share_embeddings_and_output_weights:
            assert "embedding.word_embeddings.weight" not in names  # a lookup, not a matmul
        for (n_decode, w), (n_prefill, _) in zip(decode, prefill, strict=True):
            routed = ".local_experts." in weights[id(w)]
            if w is head:
                assert (n_decode, n_prefill) == (8, 2)
            elif routed:
                assert (n_decode, n_prefill) == (round(8 * top_k / experts), round(40 * top_k / experts))
            else:
                assert (n_decode, n_prefill) == (8, 40)
        assert any(".local_experts." in n for n in names) == (name == "dsv3_tiny")

        floor = PrefillFloor(model, [5, 7, 9], batch=2)  # two prefills: 12 tokens of 2 prompts, 9 tokens of 1
        assert [(f.batch, len(f.pairs)) for f in floor.floors] == [(12, len(decode)), (9, len(decode))]
        assert floor.time() > 0 and floor.median > 0
