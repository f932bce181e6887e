"""The GRPO maths as pure, registered torch functions.

- ``advantages``: per-sequence rewards -> per-sequence advantages (grpo, dr_grpo, grpo_batch_norm, rloo);
- ``policy_loss``: per-token clipped surrogate losses (ppo with clip-higher and dual-clip, gspo);
- ``aggregation``: per-token loss -> scalar (token-mean, seq-mean-token-mean, seq-mean-token-sum,
  seq-mean-token-sum-norm), with global normalisers for micro-batches and data-parallel ranks;
- ``kl``: k1 / k2 / k3 / low_var_kl estimators, in the loss or in the reward;
- ``logits``: token log-probabilities and entropy from logits (chunked, checkpointed);
- ``rollout_correction``: truncated importance sampling (tis, tis_seq) for the rollout/trainer mismatch;
- ``metrics``: masked mean / min / max;
- ``config``: ``GRPOLossConfig``; ``objective``: ``compute_policy_objective`` combining the pieces.
"""

from r1mega.config.schema import GRPOLossConfig
from r1mega.rl.advantages import broadcast_advantages, compute_advantages, get_adv_estimator, register_adv_est
from r1mega.rl.aggregation import aggregate_loss, get_loss_agg, local_normalizers, register_loss_agg
from r1mega.rl.kl import apply_kl_to_rewards, get_kl_estimator, kl_penalty, kl_reward_penalty, register_kl_estimator
from r1mega.rl.logits import entropy_from_logits, token_logprobs
from r1mega.rl.objective import compute_policy_objective
from r1mega.rl.policy_loss import PolicyLossOutput, get_policy_loss, register_policy_loss
from r1mega.rl.rollout_correction import RolloutCorrection, get_rollout_correction, register_rollout_correction

__all__ = [
    "GRPOLossConfig",
    "PolicyLossOutput",
    "RolloutCorrection",
    "aggregate_loss",
    "apply_kl_to_rewards",
    "broadcast_advantages",
    "compute_advantages",
    "compute_policy_objective",
    "entropy_from_logits",
    "get_adv_estimator",
    "get_kl_estimator",
    "get_loss_agg",
    "get_policy_loss",
    "get_rollout_correction",
    "kl_penalty",
    "kl_reward_penalty",
    "local_normalizers",
    "register_adv_est",
    "register_kl_estimator",
    "register_loss_agg",
    "register_policy_loss",
    "register_rollout_correction",
    "token_logprobs",
]
