"""Parameters and model-state bytes per rank.

The per-rank counts for TP=2 and EP=2 below were also checked against megatron-core 0.16.1 GPTModels
built in 2-process gloo groups (same numbers); ``tests/models/test_params.py`` checks the whole model.
"""

from __future__ import annotations

import pytest

from r1mega.config.load import compose_config
from r1mega.config.schema import R1Config
from r1mega.config.validate import Accelerator, validate
from r1mega.models.memory import bytes_per_param, peak_memory, stage_memory, stage_params
from r1mega.models.params import count_params
from r1mega.parallel.layout import layout

CPU = Accelerator(cuda=False, transformer_engine=False)


def _config(*overrides: str) -> R1Config:
    # The hand-computed figures for the tiny presets are written for a 512-token vocabulary.
    tiny = ["model.vocab_size=512"] if any(o.startswith("model=") and o.endswith("_tiny") for o in overrides) else []
    cfg = compose_config([*overrides, *tiny])
    validate(cfg, accel=CPU)
    return cfg


def _stages(*overrides: str) -> list:
    cfg = _config(*overrides)
    return stage_params(cfg, layout(cfg, cfg.parallel.world_size))


def test_single_rank_holds_everything() -> None:
    cfg = _config("model=dsv3_tiny")
    (stage,) = stage_params(cfg, layout(cfg, 1))
    assert stage.total == count_params(cfg.model).total_with_mtp
    assert stage.expert == 4 * 8 * (64 * 2 * 32 + 32 * 64)  # 3 MoE decoder layers + MTP, 8 experts each


def test_tensor_parallel_splits_all_but_norms() -> None:
    (rank,) = {s.total for s in _stages("model=llama_tiny", "parallel=tp2")}
    per_layer = (64 * 128 + 64 * 64 + 64 * 352 + 176 * 64) // 2 + 2 * 64
    assert rank == 2 * per_layer + 2 * (512 * 64 // 2) + 64 == 79_168


def test_mla_tensor_parallel_matches_megatron() -> None:
    dense_mla = [
        "model=dsv3_tiny",
        "parallel=tp2",
        "model.num_experts=null",
        "model.moe_first_k_dense=0",
        "model.moe_shared_expert_intermediate_size=null",
        "model.moe_router_enable_expert_bias=false",
        "model.moe_router_num_groups=null",
        "model.moe_router_group_topk=null",
    ]
    assert _stages(*dense_mla)[0].total == 169_920


def test_expert_parallel_splits_experts() -> None:
    (stage,) = _stages("model=dsv3_tiny", "parallel=ep2")
    assert (stage.dense, stage.expert) == (217_792, 98_304)


def test_pipeline_places_embedding_output_and_mtp() -> None:
    p = count_params(_config("model=dsv3_tiny").model)
    first, last = _stages("model=dsv3_tiny", "parallel=pp2")
    assert first.layers == [0, 1] and last.layers == [2, 3]
    assert first.embedding and not first.output and last.output
    # With MTP on a later stage, megatron-core keeps an embedding copy there for the shifted tokens.
    assert last.embedding
    assert first.total + last.total == p.total_with_mtp + p.embedding
    assert first.total == p.embedding + p.layers[0].total + p.layers[1].total


def test_tied_output_is_copied_to_the_last_stage() -> None:
    p = count_params(_config("model=qwen2_tiny").model)
    first, last = _stages("model=qwen2_tiny", "parallel=pp2")
    assert not last.embedding
    assert first.total + last.total == p.total + p.embedding


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], (4, 4, 8)),
        (["precision=bf16"], (2, 4, 12)),
        (["precision=bf16", "precision.grad_reduce_in_fp32=false"], (2, 2, 12)),
    ],
)
def test_bytes_per_param(overrides: list, expected: tuple) -> None:
    assert bytes_per_param(_config(*overrides)) == expected


def test_distributed_optimizer_divides_by_dense_and_expert_dp() -> None:
    cfg = _config("model=deepseek_v3", "parallel=dsv3_2048", "precision=bf16")
    lay = layout(cfg, 2048)
    estimates = stage_memory(cfg, lay)
    for e in estimates:
        sp = e.params
        assert e.weights == 2 * sp.total and e.grads == 4 * sp.total and e.optimizer == 12 * sp.total
        assert e.optimizer_distributed == -(-12 * sp.dense // 128) + 12 * sp.expert // 2
    peak = peak_memory(estimates, distributed=True)
    assert peak.params.stage == 0 and peak.params.layers == [0, 1, 2, 3]
    # Three dense layers, one MoE layer with 4 of 256 experts, and the embedding: about 3.1B parameters.
    assert peak.params.total == pytest.approx(3.09e9, rel=0.01)
    assert peak.total_distributed / 2**30 == pytest.approx(18.5, rel=0.01)
    assert peak_memory(estimates, distributed=False).total > 2.5 * peak.total_distributed
