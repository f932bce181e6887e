"""The multi-token-prediction term of the RL loss: the MTP heads' cross entropy on the policy's own responses.

DeepSeek-V3's MTP module at depth ``k`` predicts the token ``k`` places after the main head's: with the main head's
``labels[t]`` (the next token at position ``t``), depth ``k``'s logits at ``t`` are scored against ``labels[t + k]``,
where ``loss_mask[t + k]`` says that label is trained. Pure tensor maths, no model: the caller gets the heads' logits
from :func:`r1mega.models.forward.forward_logits_mtp`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from r1mega.rl.logits import token_logprobs


def mtp_cross_entropy(heads: list[Tensor], labels: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum of cross entropy over depths and trained targets, depth-1 correct top-1 predictions, depth-1 targets)``.

    ``heads``: one ``(b, s, V)`` logits tensor per depth; ``labels`` and ``loss_mask``: ``(b, s)`` as for the main
    head. Targets past the end of a row are not trained. Within packed rows a target and its position belong to the
    same sequence as long as every sequence starts with more than ``len(heads)`` untrained tokens (a prompt).
    The cross entropy is differentiable; the counts are not.
    """
    total = labels.new_zeros((), dtype=torch.float32)
    correct = count = total
    for k, z in enumerate(heads, start=1):
        target = torch.roll(labels, -k, dims=1)  # (b, s): labels[t + k]; the wrapped tail is masked below
        m = torch.roll(loss_mask.float(), -k, dims=1)  # (b, s)
        m[:, -k:] = 0
        total = total - (token_logprobs(z, target) * m).sum()
        if k == 1:
            correct = ((z.detach().argmax(-1) == target).float() * m).sum()
            count = m.sum()
    return total, correct, count
