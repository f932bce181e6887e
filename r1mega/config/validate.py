"""Cross-group validation: everything that needs more than one config group to check.

``validate(cfg, world_size)`` runs before any process group or model is built, so a wrong layout fails
in a second with one line naming the key, the value and what would be valid (``ConfigError``).
"""

from __future__ import annotations

from dataclasses import dataclass

from r1mega.config.errors import ConfigError
from r1mega.config.schema import R1Config


@dataclass(frozen=True)
class Accelerator:
    """What the machine offers; detected at run time, passed in so validation stays testable."""

    cuda: bool
    transformer_engine: bool
    grouped_gemm: bool = False
    """``torch._grouped_mm``'s bf16 CUDA kernels run here (a Hopper GPU or newer, sm_90+)."""


def detect_accelerator() -> Accelerator:
    """CUDA, Transformer Engine and grouped-GEMM availability, without importing megatron-core."""
    import torch

    from r1mega.utils.device import grouped_mm_works

    cuda = torch.cuda.is_available()
    grouped = cuda and grouped_mm_works(torch.device("cuda"), torch.bfloat16)
    te = False
    if cuda:
        try:  # TE raises RuntimeError (not ImportError) when its CUDA libraries are missing
            import transformer_engine.pytorch  # noqa: F401

            te = True
        except Exception:
            te = False
    return Accelerator(cuda=cuda, transformer_engine=te, grouped_gemm=grouped)


def data_parallel_size(cfg: R1Config, world_size: int) -> int:
    p = cfg.parallel
    return world_size // p.model_parallel_size


def pipeline_stage_layers(cfg: R1Config) -> list[int]:
    """Decoder layers on each pipeline stage (before virtual-pipeline chunking)."""
    p, n = cfg.parallel, cfg.model.num_layers
    pp = p.pipeline_model_parallel_size
    first, last = p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage
    middle_stages = pp - (first is not None) - (last is not None)
    rest = n - (first or 0) - (last or 0)
    per = rest // middle_stages if middle_stages else 0
    layers = [per] * pp
    if first is not None:
        layers[0] = first
    if last is not None:
        layers[-1] = last
    return layers


def validate(cfg: R1Config, world_size: int | None = None, accel: Accelerator | None = None) -> int:
    """Check the whole config for ``world_size`` processes; returns the data-parallel size.

    ``world_size`` is the launcher's; None uses ``parallel.world_size`` (offline checks).
    """
    accel = accel or detect_accelerator()
    p, m = cfg.parallel, cfg.model
    if world_size is None:
        if p.world_size is None:
            raise ConfigError("parallel.world_size", None, "a number of processes when no launcher gives one")
        world_size = p.world_size
    elif p.world_size is not None and p.world_size != world_size:
        raise ConfigError(
            "parallel.world_size", p.world_size, f"{world_size} (the processes launched), or null to accept any"
        )
    _validate_layout(cfg, world_size)
    dp = data_parallel_size(cfg, world_size)
    _validate_model_split(cfg, dp)
    _validate_pipeline(cfg)
    _validate_recompute(cfg, accel)
    _validate_precision(cfg, accel)
    _validate_moe_experts(cfg, accel)
    if cfg.stage.name != "grpo":  # GRPO's batch is grpo.prompts_per_step x grpo.group_size (checked below)
        _validate_batches(cfg, dp)
    if cfg.stage.name == "grpo":
        _validate_grpo(cfg, dp)
    if cfg.grpo.rollout_compile:
        _validate_rollout_compile(cfg, accel)
    if cfg.stage.name in ("sft", "grpo", "reward_model") and cfg.data.source != "jsonl":
        raise ConfigError(
            "data.source",
            cfg.data.source,
            f"jsonl for stage.name={cfg.stage.name} (with data.train_path and data.tokenizer)",
        )
    if cfg.data.seq_length > m.max_position_embeddings:
        raise ConfigError(
            "data.seq_length", cfg.data.seq_length, f"at most model.max_position_embeddings={m.max_position_embeddings}"
        )
    return dp


def _validate_layout(cfg: R1Config, world_size: int) -> None:
    p, m = cfg.parallel, cfg.model
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    if world_size % (tp * pp * cp):
        raise ConfigError(
            "parallel.tensor_model_parallel_size",
            tp,
            f"TP x PP x CP ({tp} x {pp} x {cp} = {tp * pp * cp}) to divide the world size {world_size} "
            "(data parallelism takes the rest)",
        )
    dp = world_size // (tp * pp * cp)
    ep, etp = p.expert_model_parallel_size, p.etp
    if ep > 1 and not m.is_moe:
        raise ConfigError("parallel.expert_model_parallel_size", ep, f"1 for the dense model '{m.name}'")
    if m.is_moe:
        if m.num_experts % ep:
            raise ConfigError(
                "parallel.expert_model_parallel_size", ep, f"a divisor of model.num_experts={m.num_experts}"
            )
        if (tp * cp * dp) % (ep * etp):
            raise ConfigError(
                "parallel.expert_model_parallel_size",
                ep,
                f"EP x ETP ({ep} x {etp}) to divide TP x CP x DP ({tp} x {cp} x {dp}) = the ranks of one pipeline stage",
            )
    if p.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel", True, "false when parallel.tensor_model_parallel_size=1")
    if (m.is_moe or m.multi_latent_attention) and tp > 1 and not p.sequence_parallel:
        raise ConfigError(
            "parallel.sequence_parallel",
            False,
            "true: MoE and MLA with TP > 1 need sequence parallelism (megatron-core)",
        )
    if cp > 1:
        raise ConfigError(
            "parallel.context_parallel_size",
            cp,
            "1: context parallelism needs Transformer Engine attention (not wired yet)",
        )


def _validate_model_split(cfg: R1Config, dp: int) -> None:
    p, m = cfg.parallel, cfg.model
    tp, etp = p.tensor_model_parallel_size, p.etp
    checks = [
        ("model.num_attention_heads", m.num_attention_heads, tp),
        ("model.make_vocab_size_divisible_by", m.padded_vocab_size, tp),
        ("model.ffn_hidden_size", m.ffn_hidden_size, tp),
    ]
    if not m.multi_latent_attention:
        checks.append(("model.num_query_groups", m.query_groups, tp))
    if m.is_moe:
        checks.append(("model.moe_ffn_hidden_size", m.moe_ffn_hidden_size, etp))
        if m.moe_shared_expert_intermediate_size:
            checks.append(("model.moe_shared_expert_intermediate_size", m.moe_shared_expert_intermediate_size, tp))
    for key, value, divisor in checks:
        if value % divisor:
            what = "padded vocabulary" if key.endswith("divisible_by") else key.split(".")[-1]
            raise ConfigError(key, value, f"{what} divisible by the tensor-parallel size {divisor}")
    seq = cfg.data.seq_length
    if p.sequence_parallel and seq % tp:
        raise ConfigError(
            "data.seq_length", seq, f"a multiple of parallel.tensor_model_parallel_size={tp} (sequence parallel)"
        )


def _validate_pipeline(cfg: R1Config) -> None:
    p, m = cfg.parallel, cfg.model
    pp, vpp = p.pipeline_model_parallel_size, p.vpp
    first, last = p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage
    if pp == 1:
        for key, value in (("num_layers_in_first_pipeline_stage", first), ("num_layers_in_last_pipeline_stage", last)):
            if value is not None:
                raise ConfigError(f"parallel.{key}", value, "null when parallel.pipeline_model_parallel_size=1")
        return
    if (first is not None or last is not None) and vpp > 1:
        raise ConfigError(
            "parallel.virtual_pipeline_model_parallel_size", vpp, "null with an uneven first/last pipeline stage"
        )
    middle_stages = pp - (first is not None) - (last is not None)
    rest = m.num_layers - (first or 0) - (last or 0)
    if rest < 0 or (middle_stages == 0 and rest != 0) or (middle_stages and rest % (middle_stages * vpp)):
        hint = (
            f"model.num_layers={m.num_layers} divisible by PP x VPP = {pp * vpp}, or an uneven split with "
            "parallel.num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage"
        )
        key = (
            "parallel.pipeline_model_parallel_size"
            if first is None and last is None
            else "parallel.num_layers_in_first_pipeline_stage"
        )
        raise ConfigError(key, pp if first is None and last is None else first, hint)
    if min(pipeline_stage_layers(cfg)) < 1 and vpp == 1:
        raise ConfigError(
            "parallel.pipeline_model_parallel_size",
            pp,
            f"at most one stage per layer (model.num_layers={m.num_layers})",
        )


def _validate_recompute(cfg: R1Config, accel: Accelerator) -> None:
    """Full recompute's unit fits the layers of a pipeline stage; selective modules exist in this model."""
    p, m = cfg.parallel, cfg.model
    if p.recompute_granularity == "full":
        most = (
            min(pipeline_stage_layers(cfg))
            if p.recompute_method == "block"
            else m.num_layers // p.pipeline_model_parallel_size
        )
        if p.recompute_num_layers > most:
            raise ConfigError(
                "parallel.recompute_num_layers", p.recompute_num_layers, f"between 1 and {most} (layers per stage)"
            )
    if p.recompute_granularity == "selective":
        needs = {
            "mla_up_proj": m.multi_latent_attention,
            "moe": m.num_experts,
            "shared_experts": m.moe_shared_expert_intermediate_size,
        }
        for name in p.recompute_modules:
            if name in needs and not needs[name]:
                raise ConfigError("parallel.recompute_modules", name, f"a module model={m.name} has ({name} needs it)")
            if name == "moe_act" and not (uses_transformer_engine(cfg, accel) and moe_experts(cfg, accel) == "grouped"):
                raise ConfigError(
                    "parallel.recompute_modules",
                    name,
                    "not moe_act without Transformer Engine's grouped experts (megatron-core 0.16.1 recomputes "
                    "the expert activation through CheckpointWithoutOutput, which reads TE's FP8 state)",
                )
            if name == "layernorm" and not accel.transformer_engine:
                # megatron-core 0.16.1's CheckpointWithoutOutput() sets fp8 = (False is not None) and then reads
                # TE's FP8 state: the norm recompute works only where TE is installed.
                raise ConfigError(
                    "parallel.recompute_modules",
                    name,
                    "not layernorm without Transformer Engine (megatron-core 0.16.1)",
                )


def fp8_backend(cfg: R1Config, accel: Accelerator) -> str | None:
    """Who runs FP8 here: "te", "torch", or None without FP8 (``precision.fp8_backend=auto`` resolved)."""
    pr = cfg.precision
    if pr.fp8 is None:
        return None
    if pr.fp8_backend != "auto":
        return pr.fp8_backend
    return "te" if accel.cuda and accel.transformer_engine and pr.transformer_impl != "local" else "torch"


def uses_transformer_engine(cfg: R1Config, accel: Accelerator) -> bool:
    """TE layers when asked for, or on ``auto`` when TE runs on a GPU here (and FP8, if on, is TE's)."""
    impl = cfg.precision.transformer_impl
    if impl == "local":
        return False
    if impl == "auto":
        return accel.cuda and accel.transformer_engine and fp8_backend(cfg, accel) != "torch"
    return True


def moe_experts(cfg: R1Config, accel: Accelerator) -> str | None:
    """How the routed experts run, "grouped" or "sequential" (``model.moe_experts=auto`` resolved); None when
    the model is dense. Auto groups them where a grouped GEMM runs fast: Transformer Engine's, or torch's in
    bf16 on Hopper (not with the torch FP8 backend, whose FP8 linears are per expert)."""
    m = cfg.model
    if not m.is_moe:
        return None
    if m.moe_experts != "auto":
        return m.moe_experts
    if uses_transformer_engine(cfg, accel):
        return "grouped"
    return "grouped" if accel.grouped_gemm and _local_grouped_refusal(cfg, accel) is None else "sequential"


def _local_grouped_refusal(cfg: R1Config, accel: Accelerator) -> str | None:
    """What would be valid instead of local grouped experts here, or None where they run: ``torch._grouped_mm``
    in bf16 on a CUDA GPU from Hopper on, any float dtype on a CPU, over rows of 16-byte multiples, not with the
    torch FP8 backend. (A torch without ``_grouped_mm``, before 2.9, is refused when the layer is built:
    validation does not import torch.)"""
    m = cfg.model
    width = 16 // (2 if cfg.precision.dtype == "bf16" else 4)  # elements per 16 bytes
    ffn = (m.moe_ffn_hidden_size or 0) // cfg.parallel.etp  # each rank's share of an expert's intermediate size
    for key, size in (("model.hidden_size", m.hidden_size), ("model.moe_ffn_hidden_size / parallel.etp", ffn)):
        if size % width:
            return f"sequential: {key} = {size} is not a multiple of {width} (grouped GEMMs need 16 bytes)"
    if fp8_backend(cfg, accel) == "torch":
        return "sequential or auto with precision.fp8_backend=torch (its FP8 expert linears run one expert at a time)"
    if accel.cuda and cfg.precision.dtype != "bf16":
        return f"sequential or auto with precision.dtype={cfg.precision.dtype} on a GPU (torch's grouped GEMM is bf16)"
    if accel.cuda and not accel.grouped_gemm:
        return "sequential or auto on this GPU: torch's grouped GEMM needs sm_90+"
    return None


def _validate_moe_experts(cfg: R1Config, accel: Accelerator) -> None:
    """Grouped experts in the local spec only where they run (``_local_grouped_refusal``)."""
    if moe_experts(cfg, accel) != "grouped" or uses_transformer_engine(cfg, accel):
        return
    refusal = _local_grouped_refusal(cfg, accel)
    if refusal is not None:
        raise ConfigError("model.moe_experts", "grouped", refusal)


def _validate_precision(cfg: R1Config, accel: Accelerator) -> None:
    pr = cfg.precision
    te_ok = accel.cuda and accel.transformer_engine
    backend = fp8_backend(cfg, accel)
    if backend == "te" and not te_ok:
        raise ConfigError(
            "precision.fp8_backend",
            pr.fp8_backend,
            "torch or auto on this machine: the te backend needs Transformer Engine on a CUDA GPU",
        )
    if backend == "te" and pr.transformer_impl == "local":
        raise ConfigError(
            "precision.transformer_impl",
            pr.transformer_impl,
            "auto or transformer_engine with precision.fp8_backend=te",
        )
    if backend == "torch":
        _validate_torch_fp8(cfg)
    if pr.transformer_impl == "transformer_engine" and not te_ok:
        raise ConfigError(
            "precision.transformer_impl",
            pr.transformer_impl,
            "auto or local: Transformer Engine needs a CUDA GPU with TE installed",
        )


def _validate_torch_fp8(cfg: R1Config) -> None:
    """The torch FP8 backend implements DeepSeek-V3's recipe only, in megatron-core's local layers."""
    pr = cfg.precision
    if pr.transformer_impl == "transformer_engine":
        raise ConfigError(
            "precision.transformer_impl",
            pr.transformer_impl,
            "local or auto with precision.fp8_backend=torch (its FP8 linears replace the local spec's)",
        )
    if pr.fp8_recipe != "blockwise":
        raise ConfigError(
            "precision.fp8_recipe",
            pr.fp8_recipe,
            "blockwise with precision.fp8_backend=torch (1x128 activation tiles, 128x128 weight blocks)",
        )
    if pr.fp8 != "e4m3":
        raise ConfigError(
            "precision.fp8",
            pr.fp8,
            "e4m3 with precision.fp8_backend=torch (DeepSeek-V3 uses e4m3 for every tensor; hybrid's e5m2 "
            "gradients belong to Transformer Engine's recipes)",
        )


def _validate_batches(cfg: R1Config, dp: int) -> None:
    o, p = cfg.optim, cfg.parallel
    if o.global_batch_size % (o.micro_batch_size * dp):
        raise ConfigError(
            "optim.global_batch_size",
            o.global_batch_size,
            f"a multiple of optim.micro_batch_size x DP = {o.micro_batch_size} x {dp} = {o.micro_batch_size * dp}",
        )
    microbatches = o.global_batch_size // (o.micro_batch_size * dp)
    if p.vpp > 1 and microbatches % p.pipeline_model_parallel_size:
        raise ConfigError(
            "optim.global_batch_size",
            o.global_batch_size,
            f"a number of micro-batches ({microbatches}) divisible by parallel.pipeline_model_parallel_size="
            f"{p.pipeline_model_parallel_size} (interleaved pipeline)",
        )


def _validate_grpo(cfg: R1Config, dp: int) -> None:
    g, mbs = cfg.grpo, cfg.optim.micro_batch_size
    p = cfg.parallel
    if p.pipeline_model_parallel_size > 1:
        _validate_grpo_pipeline(cfg)
    if g.prompts_per_step % dp:
        raise ConfigError("grpo.prompts_per_step", g.prompts_per_step, f"a multiple of the data-parallel size {dp}")
    responses = g.prompts_per_step // dp * g.group_size
    if g.micro_batch_tokens is not None:
        mbs = 1  # token-budget micro-batches: any number of responses per mini-batch
    if g.mtp_loss_coef > 0 and not cfg.model.mtp_num_layers:
        raise ConfigError(
            "grpo.mtp_loss_coef", g.mtp_loss_coef, f"0 for model={cfg.model.name}, which has no MTP layers"
        )
    if responses % (g.mini_batches * mbs):
        raise ConfigError(
            "grpo.mini_batches",
            g.mini_batches,
            f"a divisor of the {responses} responses per rank and step that leaves a multiple of "
            f"optim.micro_batch_size={mbs} per mini-batch",
        )
    if g.prefix and cfg.data.tokenizer is None:
        raise ConfigError("data.tokenizer", None, "a tokenizer directory for stage.name=grpo")


def _validate_rollout_compile(cfg: R1Config, accel: Accelerator) -> None:
    """Compiled decode steps: the CPU, and the model whole on each process (the engine checks it again)."""
    p = cfg.parallel
    split = {"TP": p.tensor_model_parallel_size, "PP": p.pipeline_model_parallel_size,
             "EP": p.expert_model_parallel_size}  # fmt: skip
    sizes = ", ".join(f"{k}={v}" for k, v in split.items() if v > 1)
    if sizes:
        raise ConfigError("grpo.rollout_compile", True, f"false with {sizes} (compiled steps need the whole model)")
    if accel.cuda:
        raise ConfigError("grpo.rollout_compile", True, "false on CUDA (its decode steps run as CUDA graphs)")


def _validate_grpo_pipeline(cfg: R1Config) -> None:
    """What GRPO runs under pipeline parallelism: the default rollout loop (virtual stages included)."""
    g, p = cfg.grpo, cfg.parallel
    pp = p.pipeline_model_parallel_size
    if g.rollout_batch is not None:
        raise ConfigError("grpo.rollout_batch", g.rollout_batch, f"null with PP={pp} (continuous batching needs PP=1)")
    if g.speculative:
        raise ConfigError("grpo.speculative", g.speculative, f"false with PP={pp} (MTP drafts need PP=1)")
