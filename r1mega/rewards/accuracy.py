"""R1's accuracy reward: the final answer, checked by the task's verifier (math-verify when it has none).

Sandboxed: the scorer runs it in the verifier pool on ``clip_to_answer(sample)``, never in the trainer.
"""

from __future__ import annotations

from r1mega.rewards.answer import extract_answer
from r1mega.rewards.registry import VERIFIERS, RewardInput, register_reward
from r1mega.rewards.tasks import verify_math


@register_reward("accuracy", sandboxed=True)
def accuracy(sample: RewardInput) -> float:
    """1.0 when the final answer (``r1mega.rewards.answer``) is correct for ``sample.task``, else 0.0.

    Samples of a task without a registered verifier (or without a task) are checked with math-verify.
    """
    answer = extract_answer(sample.completion, sample.prefix_in_prompt)
    if answer is None:
        return 0.0
    verifier = VERIFIERS[sample.task] if sample.task in VERIFIERS else verify_math
    return float(verifier(answer, sample))
