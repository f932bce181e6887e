"""Stages of the R1 pipeline; each is a small class the shared loop drives."""

from __future__ import annotations

from collections.abc import Callable

from r1mega.stages.base import Stage
from r1mega.stages.grpo import GRPOStage
from r1mega.stages.pretrain import PretrainStage
from r1mega.stages.reward_model import RewardModelStage
from r1mega.stages.sft import SFTStage

STAGES: dict[str, Callable[..., Stage]] = {
    "pretrain": PretrainStage,
    "sft": SFTStage,
    "grpo": GRPOStage,
    "reward_model": RewardModelStage,
}


def get_stage(name: str) -> Callable[..., Stage]:
    """The stage class called ``name``; an unknown name lists the valid ones."""
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; valid: {', '.join(sorted(STAGES))}") from None
