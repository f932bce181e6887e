"""Masked reductions for metrics: padding never contributes, and an empty mask gives 0, never NaN.

Padding is removed with ``torch.where`` rather than multiplied by the mask, because ``NaN * 0`` is NaN:
whatever sits in the padding (garbage, ``inf``, ``NaN``) cannot leak into a result.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum_i m_i x_i`` over all elements (``dim=None``) or along ``dim``."""
    kept = torch.where(mask.bool(), x, 0)  # same shape as x
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum_i m_i x_i / max(sum_i m_i, 1)``: the mean over valid elements, 0 where there are none."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_min(x: Tensor, mask: Tensor) -> Tensor:
    """``min_{i: m_i=1} x_i`` over all elements; 0 when the mask is empty."""
    m = mask.bool()
    value = torch.where(m, x, torch.inf).amin()  # scalar
    return torch.where(m.any(), value, torch.zeros_like(value))


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """``max_{i: m_i=1} x_i`` over all elements; 0 when the mask is empty."""
    m = mask.bool()
    value = torch.where(m, x, -torch.inf).amax()  # scalar
    return torch.where(m.any(), value, torch.zeros_like(value))


@torch.no_grad()
def masked_stats(x: Tensor, mask: Tensor, prefix: str) -> dict[str, Tensor]:
    """``{prefix}_mean``, ``{prefix}_min`` and ``{prefix}_max`` of ``x`` over the valid elements (detached)."""
    return {
        f"{prefix}_mean": masked_mean(x, mask),
        f"{prefix}_min": masked_min(x, mask),
        f"{prefix}_max": masked_max(x, mask),
    }
