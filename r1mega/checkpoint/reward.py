"""Reward-model checkpoints: loading one (or a policy checkpoint's backbone) into ``RewardModel`` chunks.

The model is ``r1mega.models.reward``; its checkpoint keys are the policy's plus the value head's
(``HEAD_PREFIX``), so a policy checkpoint (SFT, GRPO) initialises the backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from r1mega.checkpoint.errors import CheckpointError
from r1mega.checkpoint.weights import check_loadable, check_shapes, sharded_model_state
from r1mega.models.builder import unwrap
from r1mega.models.reward import HEAD_PREFIX
from r1mega.utils.logging import get_logger

log = get_logger(__name__)


class RewardModelError(CheckpointError):
    """A reward-model checkpoint that cannot be used: says which and why (``r1mega-train`` prints it in one line)."""


def _reward_state(chunks: Sequence[torch.nn.Module], has_head: bool) -> dict[str, dict]:
    """The chunks' sharded state, without the value head's tensors when the checkpoint has none."""
    state = sharded_model_state(list(chunks))
    if has_head:
        return state
    return {name: {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIX)} for name, sd in state.items()}


def load_reward_weights(
    chunks: Sequence[torch.nn.Module], directory: str, require_head: bool = False, verify: bool = True
) -> bool:
    """Load a checkpoint into reward-model chunks (collective); returns whether it held a value head.

    A reward-model checkpoint loads whole. A policy checkpoint (SFT, GRPO: no value head) loads the backbone,
    and the head keeps its initialisation; ``require_head`` refuses such a checkpoint instead. Nothing loads
    before ``check_loadable`` passes (``verify``: the checksums of its files).
    """
    check_loadable(_reward_state(chunks, has_head=False), directory, verify)  # the folder, files, backbone
    saved = dist_checkpointing.load_tensors_metadata(directory)
    has_head = f"{HEAD_PREFIX}weight" in saved
    if require_head and not has_head:
        raise RewardModelError(
            f"{directory} holds no value head: it is not a reward-model checkpoint (train one with stage=reward_model)."
        )
    state = _reward_state(chunks, has_head)
    if has_head:
        check_shapes(state, directory)  # the value head too
    loaded = dist_checkpointing.load(state, directory)
    for i, chunk in enumerate(chunks):
        missing, unexpected = unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=False)
        missing = [k for k in missing if has_head or not k.startswith(HEAD_PREFIX)]
        if missing or unexpected:
            raise RewardModelError(
                f"{directory} does not fit the reward model: missing {missing}, unexpected {unexpected}."
            )
    if not has_head:
        log.info("reward model: backbone from %s (a policy checkpoint); the value head starts fresh", directory)
    return has_head


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint folder (``step_*`` with ``meta.json``), or the one a checkpoints folder's ``latest`` names."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    if (p / "latest").is_file() and (p / (p / "latest").read_text().strip() / "meta.json").is_file():
        return p / (p / "latest").read_text().strip()
    raise RewardModelError(
        f"No r1mega checkpoint at {path!r}: give a step_* folder with meta.json, or a checkpoints folder with 'latest'."
    )
