"""The learned reward: a trained reward model's score of a rollout, normalised to mix with the rule rewards.

R1's preference alignment adds a reward model's judgement to the rule-based rewards. ``reward_model`` is a
*group* reward: it runs in the trainer process (never in the verifier pool; the model needs the trainer's
parallel state), once per GRPO group, with one batched forward per ``reward.reward_model_batch_size``
responses. This module stays free of torch; the model (``RewardModelScorer`` of
``r1mega.rewards.reward_model_scorer``, built in the run's layout from ``reward.reward_model_path``) is loaded
once by ``attach_reward_model``, which the GRPO stage calls after creating its ``RewardScorer``. The scorer's
API is unchanged: attaching binds the model into the scorer's ``reward_model`` spec as a keyword argument.

Normalisation (``reward.reward_model_normalize``), with r_1..r_n the raw scores of one group:

- ``group_winrate`` (default): ``mean_{j != i} sigmoid(r_i - r_j)``, the Bradley-Terry probability that
  response i is preferred to another response of its group. In (0, 1) like the rule rewards, and it depends
  only on score differences, the one thing Bradley-Terry training pins down (a reward model's offset is
  arbitrary). 0.5 for a group of one or of equal scores. Its group mean is always 0.5: it carries only the
  within-group differences, which is all that group-relative advantages use (so ``reward_mean`` does not show
  reward-model progress; score held-out prompts with ``none`` for that). A learned score almost never ties, so
  with it dynamic sampling rarely finds a zero-variance group.
- ``sigmoid``: ``sigmoid(r_i)``, in (0, 1), but it moves with the model's arbitrary offset.
- ``zscore``: ``(r_i - mean) / (std + 1e-6)`` within the group (population std): mean 0, unbounded, and it
  stretches tiny differences to unit scale.
- ``none``: the raw score.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from r1mega.rewards.registry import RewardError, RewardInput, register_reward

if TYPE_CHECKING:  # not at run time: verifier workers import this package and must stay free of torch
    from r1mega.config.schema import R1Config
    from r1mega.rewards.reward_model_scorer import RewardModelScorer
    from r1mega.rewards.scorer import RewardScorer

NAME = "reward_model"


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def group_winrate(scores: Sequence[float]) -> list[float]:
    """``mean_{j != i} sigmoid(r_i - r_j)`` for each score; 0.5 for a single score."""
    n = len(scores)
    if n == 1:
        return [0.5]
    return [sum(_sigmoid(a - b) for j, b in enumerate(scores) if j != i) / (n - 1) for i, a in enumerate(scores)]


def zscore(scores: Sequence[float]) -> list[float]:
    """``(r - mean) / (std + 1e-6)`` with the population std."""
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return [(s - mean) / (std + 1e-6) for s in scores]


NORMALIZERS: dict[str, Callable[[Sequence[float]], list[float]]] = {
    "group_winrate": group_winrate,
    "sigmoid": lambda scores: [_sigmoid(s) for s in scores],
    "zscore": zscore,
    "none": list,
}
"""``reward.reward_model_normalize`` choices (the module docstring gives the formulas)."""


def normalize_scores(scores: Sequence[float], mode: str) -> list[float]:
    """One group's raw reward-model scores, normalised by ``mode`` (a key of :data:`NORMALIZERS`)."""
    if mode not in NORMALIZERS:
        raise RewardError(f"Unknown reward-model normalisation {mode!r}: choose from {', '.join(NORMALIZERS)}.")
    return NORMALIZERS[mode](scores) if scores else []


@register_reward(NAME, group=True, options=("reward_model_normalize",))
def reward_model(
    samples: Sequence[RewardInput],
    values: Sequence[Mapping[str, float]],
    *,
    reward_model_normalize: str = "group_winrate",
    model: RewardModelScorer | None = None,
) -> list[float]:
    """The attached reward model's scores of one GRPO group, normalised (see the module docstring)."""
    if model is None:
        raise RewardError(
            "The reward_model reward has no model: set reward.reward_model_path to a reward-model checkpoint; the "
            "GRPO stage loads it with attach_reward_model (r1mega.rewards.reward_model)."
        )
    return normalize_scores(model.score(samples), reward_model_normalize)


def bind_reward_model(scorer: RewardScorer, model: Any) -> None:
    """Make ``scorer``'s ``reward_model`` reward use ``model`` (anything with ``score(samples) -> list[float]``)."""
    if NAME not in scorer.specs:
        raise RewardError(f"The scorer computes no {NAME!r} reward: give it a weight in reward.weights.")
    spec = scorer.specs[NAME]
    scorer.specs[NAME] = dataclasses.replace(spec, fn=functools.partial(spec.fn, model=model))


def attach_reward_model(scorer: RewardScorer, cfg: R1Config, tokenizer: Any) -> None:
    """Load ``cfg.reward.reward_model_path`` in this run's layout and bind it into ``scorer`` (collective over
    the model-parallel ranks); does nothing when ``reward.weights`` has no ``reward_model``."""
    if NAME not in scorer.specs:
        return
    # torch and megatron-core: only in the trainer process
    from r1mega.rewards.reward_model_scorer import RewardModelScorer

    bind_reward_model(scorer, RewardModelScorer.from_checkpoint(cfg, tokenizer))
