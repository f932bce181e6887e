"""``r1mega-check``: check a config and show its layout, parameters, memory and FLOPs, in about a second.

    r1mega-check model=deepseek_v3 parallel=dsv3_2048 precision=bf16
    r1mega-check model=qwen2_5_7b parallel=tp2 --world-size 16

Arguments are Hydra overrides, as for ``r1mega-train``. Nothing here imports megatron-core or starts a
process group: the config is composed and validated, then the rank layout, parameter counts and memory
are computed analytically (``r1mega.parallel.layout``, ``r1mega.models.params``, ``r1mega.models.memory``).
A wrong config prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Sequence

from r1mega.cli.exits import fail
from r1mega.config.errors import ConfigError
from r1mega.config.load import compose_config
from r1mega.config.schema import R1Config
from r1mega.config.validate import Accelerator, detect_accelerator, validate
from r1mega.models.memory import MemoryEstimate, peak_memory, stage_memory
from r1mega.models.params import ModelParams, count_params, flops_per_token
from r1mega.models.rl_memory import HARDWARE, kv_values_per_token_layer, rl_memory, rl_time, sequences_per_replica
from r1mega.parallel.layout import Layout, layout

GROUP_LABELS = {
    "tp": "TP",
    "pp": "PP",
    "dp": "DP",
    "cp": "CP",
    "ep": "EP",
    "expert_tp": "expert TP",
    "expert_dp": "expert DP",
}
"""Group kinds shown, with their labels (``dp_cp`` equals ``dp`` while CP is 1 and is not shown)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments: Hydra overrides plus a few options of this command."""
    parser = argparse.ArgumentParser(
        prog="r1mega-check",
        description="Check an r1mega config offline: validate it, then show the rank layout, layers per "
        "pipeline stage, experts per rank, parameter counts, model-state memory per rank and FLOPs per token.",
        epilog="example: r1mega-check model=deepseek_v3 parallel=dsv3_2048 precision=bf16",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=deepseek_v3 parallel=dsv3_2048")
    parser.add_argument("--world-size", type=int, default=None, help="number of processes (sets parallel.world_size)")
    parser.add_argument("--groups", type=int, default=3, metavar="N", help="rank groups shown per kind (default 3)")
    rl = parser.add_argument_group("stage=grpo", "the GRPO step's memory and time (printed for stage=grpo)")
    rl.add_argument("--gpu", choices=sorted(HARDWARE), default="h200", help="accelerator for the time floor")
    rl.add_argument("--mfu", type=float, default=0.35, help="model-FLOPs utilisation assumed for the update")
    rl.add_argument("--prompt-tokens", type=int, default=512, help="prompt length of the rollout (tokens)")
    return parser.parse_intermixed_args(argv)


def accelerator() -> Accelerator:
    """This machine's accelerator, without importing torch (2+ s) when Transformer Engine is absent.

    Validation only asks for CUDA together with Transformer Engine (FP8, TE layers) or a Hopper GPU (grouped
    experts); without TE installed the first answer is "no" whatever the GPU, so the CUDA flag is a cheap guess
    from the driver's device node.
    """
    if importlib.util.find_spec("transformer_engine") is None:
        # The GPU's generation is unknown without torch: grouped experts are assumed to run (Hopper), and the
        # run itself checks (r1mega.config.validate with the detected accelerator).
        cuda = os.path.exists("/dev/nvidiactl")
        return Accelerator(cuda=cuda, transformer_engine=False, grouped_gemm=cuda)
    return detect_accelerator()


EXPERTS_RUN = {
    "grouped": "as two grouped GEMMs per MoE layer",
    "sequential": "one at a time (megatron-core's SequentialMLP)",
    "auto": "as grouped GEMMs with Transformer Engine or in bf16 on Hopper, else one at a time",
}


def fmt_count(n: float) -> str:
    """A parameter count with a unit: 671.03B, 11.61M, 512."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def fmt_bytes(n: float) -> str:
    """A byte count in binary units: 61.35 GiB."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_flops(n: float) -> str:
    """A FLOP count with a unit: 86.88 GFLOP."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}FLOP"
    return f"{n:.0f} FLOP"


def fmt_ranks(ranks: list[int], width: int = 8) -> str:
    """A rank group, shortened in the middle when long: [0, 128, 256, ..., 1920]."""
    if len(ranks) <= width:
        return "[" + ", ".join(map(str, ranks)) + "]"
    head = ", ".join(map(str, ranks[: width - 2]))
    return f"[{head}, ..., {ranks[-1]}]"


def layout_lines(lay: Layout, shown: int) -> list[str]:
    """The sizes and the first ``shown`` groups of each kind."""
    lines = [
        f"layout (megatron-core order tp-cp-ep-dp-pp, {lay.world_size} ranks):",
        f"  dense:   TP {lay.tp} x CP {lay.cp} x DP {lay.dp} x PP {lay.pp}",
    ]
    if lay.num_experts:
        lines.append(f"  experts: ETP {lay.etp} x EP {lay.ep} x expert-DP {lay.expert_dp} x PP {lay.pp}")
    for kind, label in GROUP_LABELS.items():
        if kind.startswith(("ep", "expert")) and not lay.num_experts:
            continue
        if kind == "cp" and lay.cp == 1:
            continue
        groups = lay.groups[kind]
        first = " ".join(fmt_ranks(g) for g in groups[:shown])
        more = f" ... ({len(groups) - shown} more)" if len(groups) > shown else ""
        lines.append(f"  {label:<10} {len(groups):>5} groups of {len(groups[0]):<5} {first}{more}")
    return lines


def pipeline_lines(lay: Layout) -> list[str]:
    """Decoder layers per pipeline stage (and per virtual chunk) and experts per EP rank."""
    lines = [f"pipeline: {lay.pp} stage(s), decoder layers per stage {lay.stage_layers}"]
    if lay.vpp > 1:
        for s, chunks in enumerate(lay.stage_chunks):
            spans = ", ".join(f"{c.start}-{c.stop - 1}" for c in chunks)
            lines.append(f"  stage {s}: chunks {spans}")
    else:
        spans = [
            f"{c.start}-{c.stop - 1}" if len(c) > 1 else str(c.start) for chunks in lay.stage_chunks for c in chunks
        ]
        lines.append(f"  layer indices per stage: {', '.join(spans)}")
    if lay.num_experts:
        r = lay.local_experts(0)
        lines.append(
            f"experts: {lay.num_experts} routed per MoE layer, {lay.experts_per_ep_rank} per EP rank "
            f"(EP rank 0 holds {r.start}-{r.stop - 1})"
        )
    return lines


def params_lines(cfg: R1Config, params: ModelParams) -> list[str]:
    """Total, activated and MTP parameter counts and FLOPs per token."""
    m = cfg.model
    lines = [
        f"parameters: total {fmt_count(params.total)} (embedding {fmt_count(params.embedding)}, output "
        f"{fmt_count(params.output) if params.output else 'tied'}), activated per token {fmt_count(params.activated)}",
    ]
    if params.mtp_layers:
        lines.append(
            f"  MTP module: {fmt_count(params.mtp)} in {len(params.mtp_layers)} layer(s) (shares embedding and "
            f"output; not in the total), total with MTP {fmt_count(params.total_with_mtp)}"
        )
    if m.is_moe:
        lines.append(
            f"  routed experts: {fmt_count(params.experts)}; expert-bias buffers (not parameters): {params.expert_bias}"
        )
        lines.append(f"  experts run {EXPERTS_RUN[m.moe_experts]} (model.moe_experts={m.moe_experts})")
    f = flops_per_token(m, cfg.data.seq_length)
    mtp = f", MTP {fmt_flops(f.mtp)}" if f.mtp else ""
    lines.append(
        f"FLOPs per token at seq_length {f.seq_length}: forward {fmt_flops(f.forward)} (matmul {fmt_flops(f.matmul)}, "
        f"attention {fmt_flops(f.attention)}{mtp}), training (3 x forward) {fmt_flops(f.training)}"
    )
    return lines


def memory_lines(cfg: R1Config, lay: Layout, params: ModelParams) -> list[str]:
    """Parameters and model-state bytes on the busiest rank, with and without the distributed optimizer."""
    estimates = stage_memory(cfg, lay, params)
    pr = cfg.precision
    grad_dtype = "fp32" if pr.grad_reduce_in_fp32 else pr.dtype
    lines = [f"memory per rank (model state only; weights {pr.dtype}, grads {grad_dtype}, Adam fp32; no activations):"]
    configured = cfg.parallel.use_distributed_optimizer
    for distributed in (False, True):
        e: MemoryEstimate = peak_memory(estimates, distributed)
        optim = e.optimizer_distributed if distributed else e.optimizer
        total = e.total_distributed if distributed else e.total
        name = "distributed optimizer" if distributed else "plain optimizer      "
        mark = " <- configured" if distributed == configured else ""
        p = e.params
        lines.append(
            f"  {name}: stage {p.stage}: params {fmt_count(p.total)} (dense {fmt_count(p.dense)}, experts "
            f"{fmt_count(p.expert)}); weights {fmt_bytes(e.weights)} + grads {fmt_bytes(e.grads)} + optimizer "
            f"{fmt_bytes(optim)} = {fmt_bytes(total)}{mark}"
        )
    return lines


def rl_lines(cfg: R1Config, lay: Layout, params: ModelParams, args: argparse.Namespace) -> list[str]:
    """GRPO: memory per rank with the reference model, rollout KV cache and update activations; step time."""
    hw = HARDWARE[args.gpu]
    g, p = cfg.grpo, cfg.parallel
    memory = rl_memory(cfg, lay, args.prompt_tokens, params)
    seqs = sequences_per_replica(cfg, lay)
    recompute = p.recompute_granularity or "none"
    lines = [
        f"GRPO step: {g.prompts_per_step} prompts x {g.group_size} samples, responses up to {g.max_new_tokens} "
        f"tokens after {args.prompt_tokens}-token prompts; {seqs} sequences per data-parallel replica "
        f"(DP {lay.dp}); KV cache {kv_values_per_token_layer(cfg, lay.tp)} values/token/layer; recompute "
        f"{recompute}; reference model {'on' if g.loss.kl_coef > 0 else 'off (kl_coef=0)'}",
        f"memory per rank during the step ({hw.name}, {hw.memory_gib:.0f} GiB):",
    ]
    for r in memory:
        fits = "fits" if r.total <= hw.memory_gib * 2**30 else "DOES NOT FIT"
        lines.append(
            f"  stage {r.model_state.params.stage:2d}: model state {fmt_bytes(r.state)} + reference "
            f"{fmt_bytes(r.reference)} + max(rollout KV cache {fmt_bytes(r.kv_cache)}, update activations "
            f"{fmt_bytes(r.activations)}) = {fmt_bytes(r.total)} ({fits})"
        )
    t = rl_time(cfg, lay, args.prompt_tokens, hw, args.mfu)
    lines.append(
        f"time per step at the {hw.name} floor: rollout {t.rollout_pipelined:.0f} s with {t.row_groups} row groups in "
        f"flight ({t.rollout_one_group:.0f} s with one; decode {t.bound}-bound), update {t.update:.0f} s at "
        f"{args.mfu:.0%} MFU; responses at full length"
    )
    lines.append(
        f"  compare: a refit into a generation layout without PP (attention TP {t.refit_tp} x experts over all "
        f"{lay.world_size} ranks) decodes in {t.rollout_refit:.0f} s, for {fmt_bytes(t.refit_bytes)} more weights "
        f"and a {fmt_bytes(t.refit_kv)} KV cache per rank"
    )
    return lines


def report(cfg: R1Config, world_size: int, dp: int, shown: int, args: argparse.Namespace | None = None) -> list[str]:
    """Every line ``r1mega-check`` prints for a valid config."""
    lay = layout(cfg, world_size)
    params = count_params(cfg.model)
    m, o = cfg.model, cfg.optim
    header = (
        f"r1mega-check: model {m.name} ({m.family}), {world_size} rank(s), precision {cfg.precision.dtype}; "
        f"config OK (DP {dp}, {o.global_batch_size // (o.micro_batch_size * dp)} micro-batch(es) per step)"
    )
    return [
        header,
        *layout_lines(lay, shown),
        *pipeline_lines(lay),
        *params_lines(cfg, params),
        *memory_lines(cfg, lay, params),
        *(rl_lines(cfg, lay, params, args or parse_args([])) if cfg.stage.name == "grpo" else []),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``r1mega-check``."""
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.world_size is not None:
        overrides.append(f"parallel.world_size={args.world_size}")
    try:
        cfg = compose_config(overrides)
        dp = validate(cfg, accel=accelerator())
    except ConfigError as error:
        fail(error)
    for line in report(cfg, cfg.parallel.world_size, dp, args.groups, args):
        print(line)


if __name__ == "__main__":
    main()
