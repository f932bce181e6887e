"""Build megatron-core ``GPTModel`` chunks from r1mega's typed config.

``transformer_config`` maps ``R1Config`` onto megatron-core's ``TransformerConfig`` (or
``MLATransformerConfig``); ``build_model`` builds one model chunk per virtual pipeline stage with the
layer specs chosen in ``r1mega.models.spec``. Parallel process groups come from megatron-core's
parallel state, initialised by ``r1mega.parallel.bootstrap``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from r1mega.config.schema import R1Config
from r1mega.config.validate import detect_accelerator, fp8_backend, moe_experts, uses_transformer_engine
from r1mega.models import spec
from r1mega.models.registry import get_family

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def use_transformer_engine(cfg: R1Config) -> bool:
    """TE layers when asked for, or on ``auto`` when TE runs on a GPU here (and FP8, if on, is TE's)."""
    return cfg.precision.transformer_impl != "local" and uses_transformer_engine(cfg, detect_accelerator())


def use_torch_fp8(cfg: R1Config) -> bool:
    """r1mega's blockwise FP8 linears in the local spec (``precision.fp8_backend`` torch, or auto without TE)."""
    return fp8_backend(cfg, detect_accelerator()) == "torch"


def _moe_kwargs(cfg: R1Config) -> dict[str, Any]:
    m = cfg.model
    if not m.is_moe:
        return {}
    return dict(
        num_moe_experts=m.num_experts,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_router_topk=m.moe_router_topk,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_layer_freq=m.moe_layer_pattern(),
        moe_router_score_function=m.moe_router_score_function,
        moe_router_num_groups=m.moe_router_num_groups,
        moe_router_group_topk=m.moe_router_group_topk,
        moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=m.moe_router_bias_update_rate,
        moe_router_load_balancing_type=m.moe_router_load_balancing_type,
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_token_dispatcher_type=m.moe_token_dispatcher_type,
        moe_router_dtype="fp32",
        moe_grouped_gemm=moe_experts(cfg, detect_accelerator()) == "grouped",
        moe_permute_fusion=False,
        moe_router_fusion=False,
    )


def _mla_kwargs(cfg: R1Config) -> dict[str, Any]:
    m = cfg.model
    return dict(
        q_lora_rank=m.q_lora_rank,
        kv_lora_rank=m.kv_lora_rank,
        qk_head_dim=m.qk_head_dim,
        qk_pos_emb_head_dim=m.qk_pos_emb_head_dim,
        v_head_dim=m.v_head_dim,
        qk_layernorm=True,  # the norms on the compressed q and kv (DeepSeek's q_a/kv_a_layernorm)
        rope_type="yarn" if m.rope_scaling == "yarn" else "rope",
        rotary_base=m.rotary_base,
        rotary_scaling_factor=m.rope_scaling_factor,
        original_max_position_embeddings=m.original_max_position_embeddings,
        beta_fast=m.yarn_beta_fast,
        beta_slow=m.yarn_beta_slow,
        mscale=m.yarn_mscale,
        mscale_all_dim=m.yarn_mscale_all_dim,
    )


def transformer_config(cfg: R1Config) -> TransformerConfig:
    """megatron-core's config for this run (MLATransformerConfig for MLA models)."""
    m, p, pr = cfg.model, cfg.parallel, cfg.precision
    use_te = use_transformer_engine(cfg)
    te_fp8 = pr.fp8 is not None and not use_torch_fp8(cfg)
    cuda = torch.cuda.is_available()
    dtype = _DTYPES[pr.dtype]
    kwargs: dict[str, Any] = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        params_dtype=dtype,
        bf16=pr.dtype == "bf16",
        pipeline_dtype=dtype,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=p.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=p.num_layers_in_last_pipeline_stage,
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.etp,
        sequence_parallel=p.sequence_parallel,
        recompute_granularity=p.recompute_granularity,
        recompute_method=p.recompute_method,
        recompute_num_layers=p.recompute_num_layers,
        recompute_modules=list(p.recompute_modules),
        mtp_num_layers=m.mtp_num_layers or None,
        mtp_loss_scaling_factor=m.mtp_loss_scaling_factor,
        # Without CUDA, weights are initialised on the CPU from the full (unsharded) master weight, so
        # every TP/EP layout starts from the same weights for the same seed.
        use_cpu_initialization=not cuda,
        deterministic_mode=cfg.deterministic,
        # Fusions that need TE, apex or CUDA kernels: off unless TE runs on a GPU.
        gradient_accumulation_fusion=False,
        apply_rope_fusion=use_te,
        persist_layer_norm=False,
        masked_softmax_fusion=use_te,
        bias_dropout_fusion=use_te,
        bias_activation_fusion=False,
        cross_entropy_loss_fusion=False,
        # TE's FP8 only: the torch backend's FP8 lives in the layer spec, and megatron would look for TE.
        fp8=pr.fp8 if te_fp8 else None,
        fp8_recipe=pr.fp8_recipe if te_fp8 else "delayed",
        **_moe_kwargs(cfg),
    )
    if m.multi_latent_attention:
        return MLATransformerConfig(**kwargs, **_mla_kwargs(cfg))
    return TransformerConfig(**kwargs)


def build_model(
    cfg: R1Config, config: TransformerConfig | None = None, model_cls: Callable[..., GPTModel] = GPTModel
) -> list[GPTModel]:
    """One ``GPTModel`` per virtual pipeline stage held by this rank (a list of one without VPP).

    ``model_cls`` builds each chunk from ``GPTModel``'s arguments (``r1mega.models.reward.RewardModel``).

    Needs megatron-core's parallel state (``r1mega.parallel.bootstrap``). Parameters are fp32 or bf16
    as ``precision.dtype`` says; wrapping (Float16Module, DDP) belongs to the training loop.
    """
    config = config or transformer_config(cfg)
    get_family(cfg.model.family)  # unknown family fails here with the valid names
    use_te = use_transformer_engine(cfg)
    fp8 = use_torch_fp8(cfg)
    m = cfg.model
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks: list[GPTModel] = []
    for vp_stage in range(vpp) if vpp else [None]:
        block = spec.decoder_block_spec(config, use_te, vp_stage=vp_stage, fp8=fp8)
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        model = model_cls(
            config=config,
            transformer_layer_spec=block,
            vocab_size=m.padded_vocab_size,
            max_sequence_length=m.max_position_embeddings,
            pre_process=first,
            post_process=last,
            parallel_output=True,
            share_embeddings_and_output_weights=m.tie_word_embeddings,
            position_embedding_type="none" if m.multi_latent_attention else "rope",
            rotary_base=int(m.rotary_base),
            rope_scaling=m.rope_scaling == "llama3",
            rope_scaling_factor=m.rope_scaling_factor,
            mtp_block_spec=spec.mtp_block_spec(config, block, use_te, vp_stage=vp_stage, fp8=fp8) if last else None,
            vp_stage=vp_stage,
        )
        if torch.cuda.is_available():
            # As megatron's get_model: megatron's layers are made on the GPU, but plain torch modules in the spec
            # (r1mega's RMSNorm) are made on the CPU.
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
