"""The one place that decides which megatron-core module fills each slot of a layer.

Attention: MLA (``MLASelfAttention``) or standard/GQA (``SelfAttention``). MLP: MoE (routed + shared
experts) or dense SwiGLU, per layer (the first ``moe_first_k_dense`` layers are dense). Backend:
Transformer Engine layers (fused layernorm-linear, TE attention, grouped GEMM, FP8) when TE runs on a
GPU, megatron-core's local layers otherwise; with ``fp8=True`` (``precision.fp8_backend=torch``) the local
column/row-parallel linears of attention, dense MLPs, shared and routed experts and MTP are r1mega's FP8
ones (``r1mega.models.fp8``), while embedding, output layer, router, norms, core attention and MLA's
down-projections stay bf16. Model classes never branch on the parallel layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_with_transformer_engine_spec,
    get_gpt_mtp_block_spec_for_backend,
    get_mlp_module_spec_for_backend,
)
from megatron.core.post_training.modelopt.layers import Linear
from megatron.core.transformer import multi_latent_attention as _mla_module
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from r1mega.models.attention import SDPACoreAttention
from r1mega.models.fp8 import FP8ColumnParallelLinear, FP8RowParallelLinear
from r1mega.models.grouped_experts import TorchGroupedMLP


class RMSNorm(torch.nn.RMSNorm):
    """RMSNorm that works under sequence parallelism without Transformer Engine or apex.

    megatron-core's local ``WrappedTorchNorm`` refuses ``sequence_parallel``; under SP a norm sees only
    this rank's part of the sequence, so its weight gradient must be summed over the TP group, which
    ``finalize_model_grads`` does for parameters marked ``sequence_parallel``.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused: object) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


class DuplicatedLinear(Linear):
    """A linear layer whose full weight every TP rank holds: TE's ``parallel_mode="duplicated"`` without TE.

    MLA's down-projections must be this, not column-parallel. megatron-core 0.16.1's local MLA path
    splits ``linear_kv_down_proj`` over TP and gathers its output, which leaves the gradient of the
    shared RoPE key (``k_pos_emb``) summed over only one rank's heads: TP=2 then gives gradients up to
    ~1% off the TP=1 ones (tests/parallel/test_parity.py caught it). With a duplicated weight and the
    sequence-parallel gather megatron applies to ``k_pos_emb``, the gradient is reduced over TP, and the
    weight's own gradient is summed over TP by ``finalize_model_grads`` (``sequence_parallel`` is set).
    Checkpoints are unchanged: the weight is stored as the same global tensor either way.
    """

    def __init__(
        self, input_size: int, output_size: int, *, config: TransformerConfig, init_method: Callable, **kwargs: Any
    ) -> None:
        super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
        if config.perform_initialization:
            with torch.no_grad():
                init_method(self.weight)


def allow_duplicated_mla_down_projections() -> None:
    """Let megatron-core's MLA take ``DuplicatedLinear`` down-projections (idempotent).

    ``MLASelfAttention`` accepts a down-projection class only if it is the ``Linear`` its module imported; this
    points that name at ``DuplicatedLinear`` (a subclass, so modules built before behave the same). Called by the
    local spec builder below whenever it builds MLA layers, not at import time.
    """
    _mla_module.Linear = DuplicatedLinear


class R1LocalSpecProvider(LocalSpecProvider):
    """megatron-core's local modules, with r1mega's sequence-parallel-safe RMSNorm and SDPA attention."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return RMSNorm

    def core_attention(self) -> type:
        return SDPACoreAttention

    def grouped_mlp_modules(
        self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: bool
    ) -> tuple[type, MLPSubmodules | None]:
        """Grouped experts by ``torch._grouped_mm`` (megatron-core's own GroupedMLP needs the grouped_gemm
        package), else megatron-core's SequentialMLP."""
        if moe_use_grouped_gemm:
            return TorchGroupedMLP, None
        return super().grouped_mlp_modules(False, False)


class R1FP8LocalSpecProvider(R1LocalSpecProvider):
    """The local modules with DeepSeek-V3's blockwise FP8 linears (torch scaled matmul), experts included.

    MLA's down-projections (``DuplicatedLinear``; widths like 576 = 512 + 64 are not multiples of 128)
    and the router, embedding and output layer (built by megatron outside these slots) stay bf16, as in
    DeepSeek-V3. A linear whose weight dims are not multiples of 128 stays bf16 (decided when built).
    """

    def column_parallel_linear(self) -> type:
        return FP8ColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return FP8RowParallelLinear

    def grouped_mlp_modules(
        self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: bool
    ) -> tuple[type, MLPSubmodules | None]:
        # LocalSpecProvider names megatron's ColumnParallelLinear/RowParallelLinear here, not its own slots.
        return SequentialMLP, MLPSubmodules(linear_fc1=FP8ColumnParallelLinear, linear_fc2=FP8RowParallelLinear)


def _local_backend(fp8: bool) -> R1LocalSpecProvider:
    return R1FP8LocalSpecProvider() if fp8 else R1LocalSpecProvider()


def _local_layer_spec(config: TransformerConfig, moe: bool, fp8: bool = False) -> ModuleSpec:
    """A transformer layer from megatron-core's local modules (no TE, no apex); FP8 linears with ``fp8``."""
    backend = _local_backend(fp8)
    norm = backend.layer_norm(rms_norm=True)
    mlp = get_mlp_module_spec_for_backend(
        backend=backend,
        num_experts=config.num_moe_experts if moe else None,
        moe_grouped_gemm=config.moe_grouped_gemm and moe,
    )
    if config.multi_latent_attention:
        allow_duplicated_mla_down_projections()
        attention = ModuleSpec(
            module=MLASelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=MLASelfAttentionSubmodules(
                linear_q_proj=backend.column_parallel_linear(),
                linear_q_down_proj=DuplicatedLinear,
                linear_q_up_proj=backend.column_parallel_linear(),
                linear_kv_down_proj=DuplicatedLinear,
                linear_kv_up_proj=backend.column_parallel_linear(),
                core_attention=backend.core_attention(),
                linear_proj=backend.row_parallel_linear(),
                q_layernorm=norm,
                kv_layernorm=norm,
            ),
        )
    else:
        attention = ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=backend.column_parallel_linear(),
                core_attention=backend.core_attention(),
                linear_proj=backend.row_parallel_linear(),
                q_layernorm=IdentityOp,
                k_layernorm=IdentityOp,
            ),
        )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _te_layer_spec(config: TransformerConfig, moe: bool) -> ModuleSpec:
    """A transformer layer from Transformer Engine modules (GPU)."""
    return get_gpt_layer_with_transformer_engine_spec(
        num_experts=config.num_moe_experts if moe else None,
        moe_grouped_gemm=config.moe_grouped_gemm and moe,
        qk_layernorm=config.qk_layernorm,
        multi_latent_attention=config.multi_latent_attention,
    )


def layer_pattern(config: TransformerConfig) -> list[int]:
    """1 for an MoE layer, 0 for a dense one, over all decoder layers."""
    freq = config.moe_layer_freq
    if config.num_moe_experts is None:
        return [0] * config.num_layers
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    return list(freq)


def _layer_spec_fn(use_te: bool, fp8: bool) -> Callable[..., ModuleSpec]:
    if use_te:
        return _te_layer_spec
    return lambda config, moe: _local_layer_spec(config, moe, fp8=fp8)


def decoder_block_spec(
    config: TransformerConfig,
    use_te: bool,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    fp8: bool = False,
) -> TransformerBlockSubmodules:
    """The decoder layers this pipeline stage (and virtual stage) builds, with the final norm.

    ``fp8``: r1mega's blockwise FP8 linears in the local spec (``precision.fp8_backend=torch``); TE's FP8
    is switched on through ``TransformerConfig.fp8`` instead.
    """
    make = _layer_spec_fn(use_te, fp8)
    dense, moe = make(config, moe=False), make(config, moe=True)
    specs = [moe if is_moe else dense for is_moe in layer_pattern(config)]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm: type = TENorm
    else:
        final_norm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=specs[offset : offset + count], layer_norm=final_norm)


def mtp_block_spec(
    config: TransformerConfig,
    block: TransformerBlockSubmodules,
    use_te: bool,
    vp_stage: int | None = None,
    fp8: bool = False,
) -> ModuleSpec | None:
    """Multi-token-prediction layers (built on the last pipeline stage only), or None."""
    if not config.mtp_num_layers:
        return None
    if use_te:
        from megatron.core.models.backends import TESpecProvider

        backend = TESpecProvider()
    else:
        backend = _local_backend(fp8)
    make = _layer_spec_fn(use_te, fp8)
    last_layer = make(config, moe=layer_pattern(config)[-1] == 1)
    return get_gpt_mtp_block_spec_for_backend(config=config, spec=last_layer, backend=backend, vp_stage=vp_stage)
