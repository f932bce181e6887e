"""The pure-Python rank layout against megatron-core's own ``RankGenerator`` and layer offsets."""

from __future__ import annotations

import pytest
import torch

from r1mega.config.load import compose_config
from r1mega.config.schema import R1Config
from r1mega.config.validate import Accelerator, validate
from r1mega.parallel.layout import GROUP_TOKENS, ORDER, layout, rank_groups

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # megatron-core's TE/apex fallbacks on CPU

CPU = Accelerator(cuda=False, transformer_engine=False)

LAYOUTS = {
    "tp2": ["parallel=tp2"],
    "pp2": ["parallel=pp2"],
    "ep2": ["parallel=ep2"],
    "tp2_ep2_etp1": [
        "parallel=tp2",
        "parallel.world_size=8",
        "parallel.expert_model_parallel_size=2",
        "parallel.expert_tensor_parallel_size=1",
        "optim.global_batch_size=8",
    ],
    "mix64": [
        "parallel.world_size=64",
        "parallel.tensor_model_parallel_size=2",
        "parallel.sequence_parallel=true",
        "parallel.pipeline_model_parallel_size=4",
        "parallel.expert_model_parallel_size=4",
        "parallel.expert_tensor_parallel_size=1",
        "optim.global_batch_size=16",
    ],
    "dsv3_2048": ["model=deepseek_v3", "parallel=dsv3_2048"],
}
"""Layouts checked: the presets, TP with a different expert TP, a 64-rank mix and the V3 2048-rank plan."""


def _config(name: str) -> R1Config:
    cfg = compose_config(["model=dsv3_tiny", *LAYOUTS[name]] if name != "dsv3_2048" else LAYOUTS[name])
    validate(cfg, accel=CPU)
    return cfg


def _megatron_groups(cfg: R1Config, world_size: int) -> dict[str, list[list[int]]]:
    """The groups megatron-core's ``initialize_model_parallel`` would build, from its ``RankGenerator``."""
    from megatron.core.parallel_state import RankGenerator

    p = cfg.parallel
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    dp = world_size // (tp * pp * cp)
    expert_dp = world_size // (p.etp * p.expert_model_parallel_size * pp)
    order = "-".join(ORDER)
    generators = {
        "dense": RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order),
        "expert": RankGenerator(tp=p.etp, ep=p.expert_model_parallel_size, dp=expert_dp, pp=pp, cp=1, order=order),
    }
    return {kind: generators[gen].get_ranks(token) for kind, (gen, token) in GROUP_TOKENS.items()}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_groups_match_megatron_rank_generator(name: str) -> None:
    cfg = _config(name)
    world = cfg.parallel.world_size
    lay = layout(cfg, world)
    expected = _megatron_groups(cfg, world)
    for kind, groups in expected.items():
        assert lay.groups[kind] == groups, kind
        assert sorted(r for g in lay.groups[kind] for r in g) == list(range(world)), kind


@pytest.mark.parametrize(
    "sizes",
    [
        {"tp": 2, "cp": 2, "ep": 1, "dp": 2, "pp": 2},
        {"tp": 4, "cp": 1, "ep": 2, "dp": 3, "pp": 2},
        {"tp": 1, "cp": 1, "ep": 8, "dp": 1, "pp": 3},
    ],
)
@pytest.mark.parametrize("token", ["tp", "cp", "ep", "dp", "pp", "dp-cp", "tp-pp", "tp-ep", "tp-ep-pp", "tp-dp-cp"])
def test_rank_groups_match_megatron(sizes: dict[str, int], token: str) -> None:
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(order="-".join(ORDER), **sizes)
    assert rank_groups(sizes, token) == gen.get_ranks(token)


def test_rank_groups_rejects_unknown_dimension() -> None:
    with pytest.raises(ValueError, match="unknown parallel dimension"):
        rank_groups({"tp": 2}, "tp-xp")


def test_dsv3_2048_sizes_and_experts() -> None:
    lay = layout(_config("dsv3_2048"), 2048)
    assert (lay.tp, lay.pp, lay.dp, lay.ep, lay.etp, lay.expert_dp) == (1, 16, 128, 64, 1, 2)
    assert lay.stage_layers == [4] * 15 + [1]
    assert lay.experts_per_ep_rank == 4
    assert lay.local_experts(63) == range(252, 256)
    assert lay.pipeline_stage_of(0) == 0 and lay.pipeline_stage_of(2047) == 15
    assert all(len(g) == 128 for g in lay.groups["dp"]) and len(lay.groups["ep"]) == 32


STAGE_CASES = [
    dict(num_layers=61, pp=16, first=4, last=1, vpp=None),
    dict(num_layers=8, pp=2, first=None, last=None, vpp=2),
    dict(num_layers=12, pp=3, first=None, last=None, vpp=2),
    dict(num_layers=10, pp=3, first=2, last=None, vpp=None),
    dict(num_layers=10, pp=3, first=None, last=4, vpp=None),
    dict(num_layers=4, pp=1, first=None, last=None, vpp=None),
]


@pytest.mark.parametrize("case", STAGE_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_stage_chunks_match_megatron_layer_offsets(case: dict) -> None:
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    pp, vpp = case["pp"], case["vpp"]
    overrides = [
        "model=llama_tiny",
        f"model.num_layers={case['num_layers']}",
        f"parallel.world_size={pp}",
        f"parallel.pipeline_model_parallel_size={pp}",
        f"parallel.virtual_pipeline_model_parallel_size={vpp if vpp else 'null'}",
        f"parallel.num_layers_in_first_pipeline_stage={case['first'] or 'null'}",
        f"parallel.num_layers_in_last_pipeline_stage={case['last'] or 'null'}",
        f"optim.global_batch_size={2 * pp}",
    ]
    cfg = compose_config(overrides)
    validate(cfg, accel=CPU)
    lay = layout(cfg, pp)
    mcfg = TransformerConfig(
        num_layers=case["num_layers"],
        hidden_size=64,
        num_attention_heads=4,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        num_layers_in_first_pipeline_stage=case["first"],
        num_layers_in_last_pipeline_stage=case["last"],
        pipeline_dtype=torch.float32,
    )
    for s in range(pp):
        for v in range(vpp or 1):
            vp_stage = v if vpp else None
            start = get_transformer_layer_offset(mcfg, vp_stage=vp_stage, pp_rank=s)
            count = get_num_layers_to_build(mcfg, vp_stage=vp_stage, pp_rank=s)
            assert lay.stage_chunks[s][v] == range(start, start + count), (s, v)
    covered = sorted(i for chunks in lay.stage_chunks for chunk in chunks for i in chunk)
    assert covered == list(range(case["num_layers"]))
