"""Core attention for the local (non-TE) layer specs, on ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` cannot serve MLA (it rejects the separate key and value
head sizes MLA passes as ``k_channels`` / ``v_channels``) and materialises the full score matrix.
This module takes the same constructor and forward arguments, supports different q/k and v head
sizes, grouped-query attention, a causal mask aligned to the end of the keys (so a KV-cached decode
step of one query sees every cached key), explicit padding masks, and packed sequences (document
boundaries from ``PackedSeqParams.cu_seqlens_q``) through a block-diagonal causal mask.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor


class SDPACoreAttention(MegatronModule):
    """Drop-in core attention: ``(sq, b, heads, dk)`` queries -> ``(sq, b, heads * dv)`` context."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism; use Transformer Engine")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        k_channels = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(k_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        **unused: Any,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPACoreAttention")
        sq, b = query.shape[0], query.shape[1]
        sk = key.shape[0]
        # (s, b, n, d) -> (b, n, s, d)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.heads != k.shape[1]:  # grouped-query attention: repeat each key/value head
            k = k.repeat_interleave(self.heads // k.shape[1], dim=1)
            v = v.repeat_interleave(self.heads // v.shape[1], dim=1)
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        mask = self._mask(sq, sk, causal, attention_mask, packed_seq_params, q.device)
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and mask is None and sq == sk,
            scale=self.softmax_scale,
        )  # (b, n, sq, dv)
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)  # (sq, b, n * dv)

    @staticmethod
    def _mask(
        sq: int,
        sk: int,
        causal: bool,
        attention_mask: Tensor | None,
        packed: PackedSeqParams | None,
        device: torch.device,
    ) -> Tensor | None:
        """A boolean "may attend" mask broadcastable to (b, n, sq, sk), or None for plain causal."""
        allowed: Tensor | None = None
        if causal and sq != sk:  # queries are the last sq positions of sk keys (KV-cached decoding)
            q_pos = torch.arange(sk - sq, sk, device=device)
            allowed = q_pos[:, None] >= torch.arange(sk, device=device)[None, :]  # (sq, sk)
        if packed is not None:
            if sq != sk:
                raise ValueError("packed sequences need as many queries as keys")
            cu = packed.cu_seqlens_q.to(device)
            doc = torch.bucketize(torch.arange(sk, device=device), cu[1:], right=True)  # (sk,) document id
            same_doc = doc[:, None] == doc[None, :]
            if causal:
                same_doc &= torch.ones(sq, sk, dtype=torch.bool, device=device).tril()
            allowed = same_doc if allowed is None else allowed & same_doc
        if attention_mask is not None:  # megatron convention: True = masked out
            keep = ~attention_mask.bool()
            if causal and allowed is None:
                allowed = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)
            allowed = keep if allowed is None else allowed & keep
        return allowed
