"""Advantage estimators against hand-computed values, and their edge cases (constant groups, G=1)."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.rl.advantages import (
    ADV_ESTIMATORS,
    broadcast_advantages,
    compute_advantages,
    group_ids_from_size,
    group_stats,
)

ESTIMATORS = ADV_ESTIMATORS.names()


def _adv(name: str, rewards: list[float], group_size: int, eps: float = 0.0) -> list[float]:
    return compute_advantages(name, torch.tensor(rewards), group_size=group_size, eps=eps).tolist()


def test_grpo_one_correct_of_four() -> None:
    # mean 0.25; deviations [.75, -.25, -.25, -.25]; unbiased var = (.5625 + 3 * .0625) / 3 = .25, std .5
    assert _adv("grpo", [1, 0, 0, 0], 4) == [1.5, -0.5, -0.5, -0.5]


def test_grpo_std_is_unbiased() -> None:
    # groups [1, 0] and [0, 1]: mean .5, unbiased std sqrt((.25 + .25) / 1) = 0.70710678 -> +-0.5 / 0.7071
    # (the biased std 0.5 would give +-1)
    a = 0.5 / math.sqrt(0.5)
    assert _adv("grpo", [1, 0, 0, 1], 2) == pytest.approx([a, -a, -a, a], abs=1e-7)
    s = group_stats(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_ids_from_size(4, 2))
    assert s.std.tolist() == pytest.approx([math.sqrt(0.5)] * 4)
    assert s.mean.tolist() == [0.5] * 4 and s.size.tolist() == [2.0] * 4


def test_grpo_eps() -> None:
    assert _adv("grpo", [1, 0, 0, 0], 4, eps=0.5) == [0.75, -0.25, -0.25, -0.25]  # deviations / (0.5 + 0.5)


def test_dr_grpo_no_std_scaling() -> None:
    assert _adv("dr_grpo", [1, 0, 0, 0, 1, 1, 0, 0], 4) == [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]


def test_rloo_leave_one_out() -> None:
    # 1 - mean(0, 0, 0) = 1;  0 - mean(1, 0, 0) = -1/3
    assert _adv("rloo", [1, 0, 0, 0], 4) == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])
    assert _adv("rloo", [3, 1], 2) == [2.0, -2.0]


def test_grpo_batch_norm() -> None:
    # centred: [.75, -.25, -.25, -.25, .5, .5, -.5, -.5]; sum of squares 1.75, unbiased batch var 1.75 / 7 = .25
    assert _adv("grpo_batch_norm", [1, 0, 0, 0, 1, 1, 0, 0], 4) == [1.5, -0.5, -0.5, -0.5, 1.0, 1.0, -1.0, -1.0]


@pytest.mark.parametrize("name", ESTIMATORS)
def test_all_equal_groups_give_exact_zeros(name: str) -> None:
    # 0.1 * 3 / 3 != 0.1 in floating point: without the constant-group rule the advantage would be ~1e-11
    rewards = [0.1, 0.1, 0.1, 0.7, 0.7, 0.7]
    assert _adv(name, rewards, 3, eps=1e-6) == [0.0] * 6
    # a constant group next to a varied one: only the varied group is non-zero
    out = _adv(name, [0.1, 0.1, 0.1, 1.0, 0.0, 0.0], 3, eps=1e-6)
    assert out[:3] == [0.0] * 3 and all(v != 0 for v in out[3:])


@pytest.mark.parametrize("name", ESTIMATORS)
def test_group_of_one_gives_zero(name: str) -> None:
    assert _adv(name, [1.0, 0.0, 0.5], 1, eps=1e-6) == [0.0, 0.0, 0.0]
    assert _adv(name, [2.0], 1, eps=1e-6) == [0.0]


@pytest.mark.parametrize("name", ESTIMATORS)
def test_group_ids_need_not_be_contiguous(name: str) -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    contiguous = compute_advantages(name, rewards, group_size=4)
    perm = torch.tensor([4, 0, 5, 1, 2, 6, 7, 3])
    ids = torch.tensor([7, 3, 7, 3, 3, 7, 7, 3])  # any integers; 3 = first prompt, 7 = second
    shuffled = compute_advantages(name, rewards[perm], group_ids=ids)
    torch.testing.assert_close(shuffled, contiguous[perm])


def test_unequal_group_sizes() -> None:
    ids = torch.tensor([0, 0, 0, 1])  # a group of three and a singleton
    out = compute_advantages("grpo", torch.tensor([2.0, 0.0, 1.0, 5.0]), group_ids=ids, eps=0.0)
    assert out.tolist() == [1.0, -1.0, 0.0, 0.0]  # mean 1, unbiased std 1


def test_bad_groups_raise() -> None:
    with pytest.raises(ValueError, match="groups of 3"):
        compute_advantages("grpo", torch.zeros(4), group_size=3)
    with pytest.raises(ValueError, match="exactly one"):
        compute_advantages("grpo", torch.zeros(4))
    with pytest.raises(ValueError, match="exactly one"):
        compute_advantages("grpo", torch.zeros(4), group_size=2, group_ids=torch.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        compute_advantages("grpo", torch.zeros(4, 2), group_ids=torch.zeros(4))
    with pytest.raises(KeyError, match="valid: dr_grpo, grpo"):
        compute_advantages("gae", torch.zeros(4), group_size=2)


def test_no_gradient_and_dtype() -> None:
    rewards = torch.tensor([1.0, 0.0], requires_grad=True)
    assert not compute_advantages("grpo", rewards, group_size=2).requires_grad
    assert compute_advantages("grpo", torch.tensor([1, 0, 0, 1]), group_size=2).dtype == torch.float32
    assert (
        compute_advantages("grpo", torch.tensor([1.0, 0.0], dtype=torch.float64), group_size=2).dtype == torch.float64
    )


def test_broadcast_advantages() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    out = broadcast_advantages(torch.tensor([2.0, -1.0, 3.0]), mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("name", ESTIMATORS)
def test_eps_zero_never_gives_nan(name: str) -> None:
    out = _adv(name, [1.0, 1.0, 2.0], 1, eps=0.0) + _adv(name, [3.0, 3.0], 2, eps=0.0)
    assert out == [0.0] * 5
