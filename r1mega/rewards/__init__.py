"""Rule-based rewards for R1-style GRPO, and the verifier pool that checks answers safely.

Rewards are pure functions registered by name (``register_reward``) and combined with the weights of
``RewardConfig`` by ``RewardScorer``:

- ``accuracy``: the final answer (last ``\\boxed{}``) checked by the task's verifier or math-verify; runs in
  the verifier worker pool under a hard time limit (``VerifierPool``);
- ``format``: exactly one ``<think>...</think>`` block, then a non-empty answer;
- ``language``: the share of reasoning words in the prompt's script (R1's language consistency);
- ``overlong``: DAPO's soft overlong penalty; ``length``: Kimi-1.5's group length reward.
- ``reward_model``: a trained reward model's normalised score (loaded in the trainer process by the GRPO stage).

Task verifiers (``register_verifier``) cover the cold-start reasoning-gym tasks and countdown.
"""

from r1mega.rewards import accuracy as _accuracy  # noqa: F401  (registers the reward)
from r1mega.rewards import formatting as _formatting  # noqa: F401
from r1mega.rewards import language as _language  # noqa: F401
from r1mega.rewards import length as _length  # noqa: F401
from r1mega.rewards import reward_model as _reward_model  # noqa: F401
from r1mega.rewards.answer import clip_to_answer, extract_answer
from r1mega.rewards.pool import JobResult, PoolError, VerifierPool
from r1mega.rewards.registry import (
    REWARDS,
    VERIFIERS,
    RewardError,
    RewardInput,
    RewardSpec,
    get_reward,
    register_reward,
    register_verifier,
)
from r1mega.rewards.scorer import RewardBreakdown, RewardScorer, batch_metrics

__all__ = [
    "REWARDS",
    "VERIFIERS",
    "JobResult",
    "PoolError",
    "RewardBreakdown",
    "RewardError",
    "RewardInput",
    "RewardScorer",
    "RewardSpec",
    "VerifierPool",
    "batch_metrics",
    "clip_to_answer",
    "extract_answer",
    "get_reward",
    "register_reward",
    "register_verifier",
]
