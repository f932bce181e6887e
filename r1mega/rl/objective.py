"""The GRPO objective assembled from its registered pieces.

``loss = agg(L_policy) + kl_coef * agg(KL(pi || pi_ref)) - entropy_coef * agg(H)``, with one aggregation
mode (and one set of global normalisers) for all three terms. The KL term is left out when
``kl_coef == 0`` or when the KL goes into the reward instead (``kl_in_reward``); the entropy term when
``entropy_coef == 0``. Each piece stays callable on its own (``r1mega.rl.policy_loss``, ``.aggregation``,
``.kl``, ``.logits``). With ``rollout_correction`` set, the per-token policy loss is first weighted by the
registered rollout correction's truncated importance weights (``r1mega.rl.rollout_correction``).
"""

from __future__ import annotations

from functools import partial

from torch import Tensor

from r1mega.config.schema import GRPOLossConfig
from r1mega.rl.aggregation import Count, aggregate_loss
from r1mega.rl.kl import kl_penalty
from r1mega.rl.policy_loss import get_policy_loss
from r1mega.rl.rollout_correction import get_rollout_correction


def compute_policy_objective(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    config: GRPOLossConfig,
    *,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    global_tokens: Count = None,
    global_seqs: Count = None,
    rollout_logp: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar GRPO loss to minimise and detached scalar metrics.

    Shapes: ``logp``, ``old_logp``, ``mask``, ``ref_logp`` and ``entropy`` are ``(b, t)``; ``advantages``
    is ``(b,)`` or ``(b, t)``. ``ref_logp`` is needed when the KL term is on; ``entropy`` (from
    :func:`r1mega.rl.logits.entropy_from_logits`) when ``entropy_coef > 0``, and is reported when given.
    ``global_tokens`` / ``global_seqs`` are the big batch's normalisers (see :mod:`r1mega.rl.aggregation`).
    ``rollout_logp`` (b, t): the sampler's log-probabilities, needed when ``config.rollout_correction`` is set
    (``old_logp`` is then the trainer's recomputation).

    Metrics: the policy loss's own (clip fractions, ``ppo_kl``, ratio stats) plus ``pg_loss``,
    ``kl_loss`` (when the KL term is on), ``entropy`` (when given) and ``loss``.
    """
    agg = partial(
        aggregate_loss,
        mask=mask,
        mode=config.loss_agg_mode,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        max_response_length=config.max_response_length,
    )
    policy = get_policy_loss(config.policy_loss)(logp, old_logp, advantages, mask, config)
    metrics = dict(policy.metrics)
    policy_loss = policy.loss
    if config.rollout_correction is not None:
        if rollout_logp is None:
            raise ValueError(
                f"grpo.loss.rollout_correction={config.rollout_correction} weights the loss by pi_old / pi_rollout, "
                "which needs rollout_logp (the sampler's log-probabilities); pass it or set rollout_correction=null"
            )
        correction = get_rollout_correction(config.rollout_correction)
        weights, extra = correction(old_logp, rollout_logp, mask, config.rollout_is_cap)
        policy_loss = policy_loss * weights  # (b, t)
        metrics.update(extra)
    pg_loss = agg(policy_loss)
    total = pg_loss
    metrics["pg_loss"] = pg_loss.detach()

    if config.kl_coef > 0 and not config.kl_in_reward:
        if ref_logp is None:
            raise ValueError(
                "grpo.loss.kl_coef > 0 puts a KL term in the loss, which needs ref_logp (the reference model's "
                "log-probabilities); pass it, set kl_coef=0, or set kl_in_reward=true"
            )
        kl_loss = agg(kl_penalty(logp, ref_logp, mask, config.kl_estimator))
        total = total + config.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()

    if config.entropy_coef > 0 and entropy is None:
        raise ValueError("grpo.loss.entropy_coef > 0 needs the per-token entropy (entropy_from_logits); pass entropy")
    if entropy is not None:
        entropy_agg = agg(entropy)
        if config.entropy_coef > 0:
            total = total - config.entropy_coef * entropy_agg
        metrics["entropy"] = entropy_agg.detach()

    metrics["loss"] = total.detach()
    return total, metrics
