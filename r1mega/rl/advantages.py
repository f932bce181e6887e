"""Outcome advantage estimators: per-sequence scalar rewards in, per-sequence advantages out.

Every estimator has the signature ``(rewards (n,), group_ids (n,), eps) -> advantages (n,)`` and is
registered by name with :func:`register_adv_est`. A *group* is the G responses sampled for one prompt;
``group_ids[i]`` says which prompt response ``i`` answers (any integers; equal ids = same group).
:func:`compute_advantages` also accepts a plain ``group_size`` G for the usual contiguous layout
(rows ``[k*G, (k+1)*G)`` answer prompt ``k``).

The caller broadcasts the result over the response tokens (:func:`broadcast_advantages`), or hands the
``(n,)`` tensor straight to a policy loss, which broadcasts it itself.

Two edge cases hold for every estimator, exactly (not up to rounding):

- a group whose rewards are all equal gets advantage 0 for every member (no NaN, no ``1e-17 / 1e-6``);
- a group of one (G=1) gets advantage 0: one sample carries no baseline information. (verl's GRPO
  instead uses mean 0, std 1 for a singleton, i.e. advantage = raw reward; we do not.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from r1mega.rl.registry import Registry

AdvantageFn = Callable[[Tensor, Tensor, float], Tensor]
"""``(rewards (n,), group_ids (n,), eps) -> advantages (n,)``."""

ADV_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator")
register_adv_est = ADV_ESTIMATORS.register
get_adv_estimator = ADV_ESTIMATORS.get


def group_ids_from_size(n: int, group_size: int, device: torch.device | None = None) -> Tensor:
    """Group ids ``[0]*G + [1]*G + ...`` (shape ``(n,)``) for ``n`` responses in contiguous groups of ``G``."""
    if group_size < 1 or n % group_size != 0:
        raise ValueError(
            f"{n} responses cannot be split into groups of {group_size}: the group size must be a positive "
            "divisor of the number of responses (prompts x responses per prompt)"
        )
    return torch.arange(n, device=device) // group_size  # (n,)


@dataclass(frozen=True)
class GroupStats:
    """Per-sequence statistics of each sequence's group, all of shape ``(n,)``."""

    mean: Tensor
    """``mean_g = (1/G) sum_{j in g} r_j``."""
    std: Tensor
    """Unbiased (Bessel) ``std_g = sqrt(sum_{j in g} (r_j - mean_g)^2 / (G - 1))``; 0 for a group of one."""
    size: Tensor
    """``G``, the size of the sequence's group (as a float)."""
    centred: Tensor
    """``r_i - mean_g``, exactly 0 in groups whose rewards are all equal (including groups of one)."""


def group_stats(rewards: Tensor, group_ids: Tensor) -> GroupStats:
    """Group mean, unbiased std, size and centred rewards, gathered back to each sequence.

    Computed in at least float32 with ``index_add_`` over the groups, so groups need not be contiguous
    or of equal size. Rewards carry no gradient (advantages are constants of the policy loss).
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both have shape (n,); got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}. Sum token-level rewards over the response first."
        )
    r = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))  # (n,)
    uniq, inv = torch.unique(group_ids, return_inverse=True)  # (k,), (n,) group index in [0, k)
    k = uniq.numel()
    zeros = r.new_zeros(k)  # (k,)
    size = zeros.index_add(0, inv, torch.ones_like(r))  # (k,)
    mean = zeros.index_add(0, inv, r) / size  # (k,)
    dev = r - mean[inv]  # (n,)
    sum_sq = zeros.index_add(0, inv, dev * dev)  # (k,)
    std = (sum_sq / (size - 1).clamp(min=1)).sqrt()  # (k,) unbiased; 0 for singletons
    g_max = r.new_full((k,), -torch.inf).scatter_reduce(0, inv, r, "amax")  # (k,)
    g_min = r.new_full((k,), torch.inf).scatter_reduce(0, inv, r, "amin")  # (k,)
    constant = (g_max == g_min)[inv]  # (n,) all-equal groups, groups of one included
    centred = torch.where(constant, torch.zeros_like(dev), dev)  # (n,)
    return GroupStats(mean=mean[inv], std=std[inv], size=size[inv], centred=centred)


def _nonzero(denominator: Tensor) -> Tensor:
    """A zero denominator (only next to a zero numerator, when ``eps=0``) becomes 1, so 0/0 gives 0."""
    return torch.where(denominator > 0, denominator, torch.ones_like(denominator))


@register_adv_est("grpo")
def grpo_advantages(rewards: Tensor, group_ids: Tensor, eps: float) -> Tensor:
    """GRPO (DeepSeekMath): ``A_i = (r_i - mean_g) / (std_g + eps)``.

    ``std_g`` is the *unbiased* group std (divide by G-1), as ``torch.std`` in verl and TRL. Example:
    rewards ``[1, 0, 0, 0]`` in one group: mean 0.25, std 0.5, advantages ``[1.5, -0.5, -0.5, -0.5]``.
    """
    s = group_stats(rewards, group_ids)
    return s.centred / _nonzero(s.std + eps)  # (n,)


@register_adv_est("dr_grpo")
def dr_grpo_advantages(rewards: Tensor, group_ids: Tensor, eps: float) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): ``A_i = r_i - mean_g``.

    No std scaling, which removes the question-difficulty bias of GRPO; ``eps`` is unused.
    """
    return group_stats(rewards, group_ids).centred  # (n,)


@register_adv_est("grpo_batch_norm")
def grpo_batch_norm_advantages(rewards: Tensor, group_ids: Tensor, eps: float) -> Tensor:
    """Group-centred, batch-scaled (REINFORCE++-baseline style): ``A_i = c_i / (std_batch(c) + eps)``.

    ``c_i = r_i - mean_g`` and ``std_batch`` is the unbiased std of ``c`` over all n sequences. The batch
    mean of ``c`` is exactly 0 (each group's deviations sum to 0), so this is whitening at sequence level.
    (verl's ``reinforce_plus_plus_baseline`` whitens over tokens, weighting long responses more.)
    """
    c = group_stats(rewards, group_ids).centred  # (n,)
    if c.numel() < 2:
        return c
    return c / _nonzero(c.std() + eps)  # (n,)


@register_adv_est("rloo")
def rloo_advantages(rewards: Tensor, group_ids: Tensor, eps: float) -> Tensor:
    """REINFORCE leave-one-out: ``A_i = r_i - (1/(G-1)) sum_{j != i} r_j = G/(G-1) * (r_i - mean_g)``.

    A group of one has no other sample and gets 0; ``eps`` is unused.
    """
    s = group_stats(rewards, group_ids)
    return s.centred * s.size / (s.size - 1).clamp(min=1)  # (n,)


def compute_advantages(
    estimator: str,
    rewards: Tensor,
    *,
    group_size: int | None = None,
    group_ids: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Per-sequence advantages ``(n,)`` from per-sequence rewards ``(n,)`` with the named estimator.

    Give exactly one of ``group_size`` (contiguous groups of G) or ``group_ids`` (``(n,)`` integers).
    """
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (contiguous groups) or group_ids (one id per response)")
    if group_ids is None:
        assert group_size is not None
        group_ids = group_ids_from_size(rewards.numel(), group_size, rewards.device)
    return get_adv_estimator(estimator)(rewards, group_ids, eps)


def broadcast_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """``A_{i,t} = A_i * m_{i,t}``: per-sequence advantages ``(b,)`` spread over the response tokens ``(b, t)``."""
    expanded = advantages[:, None].expand(mask.shape)  # (b, t)
    return torch.where(mask.bool(), expanded, torch.zeros_like(expanded))  # (b, t)
