"""Which global rank does what: a pure-Python copy of megatron-core's rank layout.

megatron-core's ``initialize_model_parallel`` numbers ranks as a mixed-radix number in the order
``tp-cp-ep-dp-pp`` (TP fastest, PP slowest) and builds two ``RankGenerator``s over it: one for the dense
part (TP, CP, DP, PP) and one for the experts (ETP, EP, expert-DP, PP), both with the same PP groups.
``layout(cfg, world_size)`` reproduces both without importing megatron-core (which takes seconds), so
``r1mega-check`` can show the 2048-rank layout of DeepSeek-V3 instantly. ``tests/parallel/test_layout.py``
checks the groups against megatron-core's ``RankGenerator``.

Also here: the decoder layers of each pipeline stage (and of each virtual-pipeline chunk), following
megatron-core's ``get_transformer_layer_offset``, and the experts of each expert-parallel rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from r1mega.config.schema import R1Config
from r1mega.config.validate import data_parallel_size, pipeline_stage_layers

ORDER = ("tp", "cp", "ep", "dp", "pp")
"""megatron-core's default rank order (``initialize_model_parallel(order="tp-cp-ep-dp-pp")``), fastest first."""


def _offsets(dims: Sequence[tuple[int, int]]) -> list[int]:
    """All sums ``sum(i_k * stride_k)`` with ``0 <= i_k < size_k``, the first dimension varying fastest."""
    out = [0]
    for size, stride in dims:
        out = [o + i * stride for i in range(size) for o in out]
    return out


def rank_groups(sizes: dict[str, int], token: str) -> list[list[int]]:
    """The rank groups megatron-core's ``RankGenerator(...).get_ranks(token)`` returns.

    ``sizes`` gives each name of ``ORDER`` its size; ``token`` is names joined by '-' (``"tp"``,
    ``"dp-cp"``, ``"tp-ep-pp"``). A group varies the named dimensions (earlier in ``ORDER`` = faster)
    and fixes the others; groups are listed with the fixed dimensions counting up, first fastest.
    """
    names = set(token.split("-"))
    unknown = names - set(ORDER)
    if unknown:
        raise ValueError(f"unknown parallel dimension(s) {sorted(unknown)} in {token!r}; use {', '.join(ORDER)}")
    stride, dims = 1, []
    for name in ORDER:
        dims.append((name, sizes.get(name, 1), stride))
        stride *= sizes.get(name, 1)
    varied = [(size, st) for name, size, st in dims if name in names]
    fixed = [(size, st) for name, size, st in dims if name not in names]
    inner = _offsets(varied)
    return [[base + off for off in inner] for base in _offsets(fixed)]


@dataclass(frozen=True)
class Layout:
    """The process groups and the model split of one parallel config at one world size."""

    world_size: int
    """Number of processes."""
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    cp: int
    """Context-parallel size."""
    dp: int
    """Data-parallel size of the dense part (world / (TP x PP x CP))."""
    ep: int
    """Expert-parallel size."""
    etp: int
    """Tensor-parallel size inside experts."""
    expert_dp: int
    """Data-parallel size of the experts (world / (ETP x EP x PP))."""
    vpp: int
    """Virtual-pipeline chunks per stage (1 without interleaving)."""
    groups: dict[str, list[list[int]]]
    """Rank groups by kind: tp, pp, dp, dp_cp, cp, ep, expert_tp, expert_dp."""
    stage_chunks: list[list[range]]
    """Per pipeline stage, per virtual chunk: the decoder-layer indices it holds."""
    num_experts: int | None
    """Routed experts per MoE layer; None for a dense model."""

    @property
    def stage_layers(self) -> list[int]:
        """Decoder layers per pipeline stage (all its virtual chunks together)."""
        return [sum(len(chunk) for chunk in chunks) for chunks in self.stage_chunks]

    @property
    def experts_per_ep_rank(self) -> int:
        """Routed experts each expert-parallel rank holds of every MoE layer (0 for a dense model)."""
        return self.num_experts // self.ep if self.num_experts else 0

    def local_experts(self, ep_rank: int) -> range:
        """Indices of the routed experts held by expert-parallel rank ``ep_rank`` (contiguous blocks)."""
        n = self.experts_per_ep_rank
        return range(ep_rank * n, (ep_rank + 1) * n)

    def pipeline_stage_of(self, rank: int) -> int:
        """The pipeline stage of a global rank (PP is the slowest dimension of the order)."""
        return rank // (self.world_size // self.pp)


GROUP_TOKENS = {
    "tp": ("dense", "tp"),
    "pp": ("dense", "pp"),
    "dp": ("dense", "dp"),
    "dp_cp": ("dense", "dp-cp"),
    "cp": ("dense", "cp"),
    "ep": ("expert", "ep"),
    "expert_tp": ("expert", "tp"),
    "expert_dp": ("expert", "dp"),
}
"""Group kind -> (which generator, megatron-core token), as ``initialize_model_parallel`` builds them."""


def layer_offset(cfg: R1Config, pp_rank: int, vp_stage: int = 0) -> int:
    """First decoder layer of (pipeline stage, virtual chunk): megatron-core's ``get_transformer_layer_offset``."""
    p, n = cfg.parallel, cfg.model.num_layers
    pp, vpp = p.pipeline_model_parallel_size, p.vpp
    if pp == 1:
        return 0
    first, last = p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage
    if first is None and last is None:
        per_chunk = n // pp // vpp
        return vp_stage * (n // vpp) + pp_rank * per_chunk
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = n - (first or 0) - (last or 0)
    middle_rank = pp_rank if first is None else pp_rank - 1
    first_chunk, last_chunk = (first or 0) // vpp, (last or 0) // vpp
    middle_chunk = middle_layers // vpp
    if pp_rank == 0:
        return vp_stage * (first_chunk + middle_chunk + last_chunk)
    per_middle = middle_chunk // middle_stages if middle_stages else 0
    return vp_stage * (first_chunk + middle_chunk + last_chunk) + first_chunk + middle_rank * per_middle


def stage_chunks(cfg: R1Config) -> list[list[range]]:
    """Decoder layers of every (pipeline stage, virtual chunk), as index ranges."""
    vpp = cfg.parallel.vpp
    counts = pipeline_stage_layers(cfg)
    return [
        [range(start, start + counts[s] // vpp) for start in (layer_offset(cfg, s, v) for v in range(vpp))]
        for s in range(len(counts))
    ]


def layout(cfg: R1Config, world_size: int) -> Layout:
    """The rank layout of ``cfg`` on ``world_size`` processes; run ``validate(cfg, world_size)`` first."""
    p = cfg.parallel
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    ep, etp = p.expert_model_parallel_size, p.etp
    dp = data_parallel_size(cfg, world_size)
    expert_dp = world_size // (etp * ep * pp)
    sizes = {
        "dense": {"tp": tp, "cp": cp, "ep": 1, "dp": dp, "pp": pp},
        "expert": {"tp": etp, "cp": 1, "ep": ep, "dp": expert_dp, "pp": pp},
    }
    groups = {kind: rank_groups(sizes[gen], token) for kind, (gen, token) in GROUP_TOKENS.items()}
    return Layout(
        world_size=world_size,
        tp=tp,
        pp=pp,
        cp=cp,
        dp=dp,
        ep=ep,
        etp=etp,
        expert_dp=expert_dp,
        vpp=p.vpp,
        groups=groups,
        stage_chunks=stage_chunks(cfg),
        num_experts=cfg.model.num_experts,
    )
