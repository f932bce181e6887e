"""Preallocated KV caches for the rollout engine: MLA's compressed latent, or per-head keys and values.

For Multi-Head Latent Attention the cache holds, per token and layer, only the normalised compressed KV
(``kv_lora_rank`` values) and the RoPE'd decoupled key (``qk_pos_emb_head_dim`` values) — DeepSeek's
"absorb" inference mode; keys and values are never expanded to heads. Standard (grouped-query)
attention caches ``2 * num_query_groups * head_dim`` values per token and layer.

Layout: ``(batch, max_len, ...)`` per layer, batch-major so that finished rows can be dropped with
one ``index_select`` (``compact``), or moved to the front in place (``compact_``) when CUDA graphs hold
the cache's addresses and a graph for fewer rows reads the leading rows (``narrow``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


@dataclass
class CacheLayout:
    """What one token costs in a layer's cache (values, not bytes), for this rank's share of heads."""

    latent: bool
    """True for MLA's compressed latent cache."""
    values_per_token: int
    """Cached values per token per layer."""
    mha_values_per_token: int
    """What standard multi-head attention caches per token per layer: ``2 * heads * head_dim``."""

    @classmethod
    def of(cls, config: TransformerConfig, tp: int = 1) -> CacheLayout:
        """The cache layout of megatron-core ``config`` on one of ``tp`` tensor-parallel ranks."""
        heads = config.num_attention_heads // tp
        if getattr(config, "multi_latent_attention", False):
            # DeepSeek's comparison: MHA with the same heads and head_dim (= v_head_dim) caches 2 * n * d.
            return cls(True, config.kv_lora_rank + config.qk_pos_emb_head_dim, 2 * heads * config.v_head_dim)
        groups = max(config.num_query_groups // tp, 1)
        return cls(False, 2 * groups * config.kv_channels, 2 * heads * config.kv_channels)


class KVCache:
    """One preallocated cache tensor per layer: ``(b, max_len, latent)`` for MLA, else K and V
    ``(b, groups, max_len, head_dim)`` each."""

    def __init__(
        self,
        config: TransformerConfig,
        num_layers: int,
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        tp: int = 1,
    ) -> None:
        self.layout = CacheLayout.of(config, tp)
        self.num_layers, self.max_len = num_layers, max_len
        if self.layout.latent:
            width = self.layout.values_per_token
            self.latent = [torch.zeros(batch, max_len, width, dtype=dtype, device=device) for _ in range(num_layers)]
            self.keys: list[Tensor] = []
            self.values: list[Tensor] = []
        else:
            groups = max(config.num_query_groups // tp, 1)
            shape = (batch, groups, max_len, config.kv_channels)
            self.latent = []
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def tensors(self) -> list[Tensor]:
        """Every cache tensor."""
        return self.latent + self.keys + self.values

    def layer(self, i: int) -> tuple[Tensor, ...]:
        """Layer ``i``'s cache tensors: ``(latent,)`` for MLA, else ``(keys, values)``."""
        return (self.latent[i],) if self.layout.latent else (self.keys[i], self.values[i])

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the cache on this rank."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bytes_per_token(self) -> float:
        """Measured bytes per cached token summed over this rank's layers."""
        batch = self.tensors()[0].shape[0]
        return self.nbytes / (batch * self.max_len)

    @property
    def batch(self) -> int:
        """Rows of the cache."""
        return self.tensors()[0].shape[0]

    def compact(self, keep: Tensor) -> None:
        """Keep only batch rows ``keep`` (int64 indices), dropping finished sequences (new, smaller tensors)."""
        self.latent = [t.index_select(0, keep) for t in self.latent]
        self.keys = [t.index_select(0, keep) for t in self.keys]
        self.values = [t.index_select(0, keep) for t in self.values]

    def compact_(self, keep: Tensor) -> None:
        """Move rows ``keep`` (int64 indices) to the front, in place: the tensors keep their storage (captured
        CUDA graphs read it); rows from ``len(keep)`` on hold stale values."""
        for t in self.tensors():
            t[: keep.numel()] = t.index_select(0, keep)

    def put_rows(self, rows: Tensor, other: KVCache) -> None:
        """Copy every row of ``other`` (same layers, at most as many slots) into rows ``rows`` (int64 indices)
        of this cache, slots ``[0, other.max_len)``: how continuous batching installs newly prefilled prompts."""
        width = other.max_len
        for dst, src in zip(self.latent, other.latent, strict=True):
            dst[:, :width].index_copy_(0, rows, src)  # (b, width, latent)
        for dst, src in zip(self.keys + self.values, other.keys + other.values, strict=True):
            dst[:, :, :width].index_copy_(0, rows, src)  # (b, groups, width, head_dim)

    def narrow(self, batch: int) -> KVCache:
        """A cache over the first ``batch`` rows, sharing this one's storage."""
        view = object.__new__(KVCache)
        view.layout, view.num_layers, view.max_len = self.layout, self.num_layers, self.max_len
        view.latent = [t[:batch] for t in self.latent]
        view.keys = [t[:batch] for t in self.keys]
        view.values = [t[:batch] for t in self.values]
        return view
