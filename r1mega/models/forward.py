"""The training forward that returns logits rather than the language-model loss.

GRPO, evaluation of log-probabilities and parity tests need logits. megatron-core 0.16.1's ``GPTModel``
with multi-token prediction requires labels in every forward (it clones them for the MTP loss), so the
MTP block is switched off for the duration of the call: policy-gradient stages do not train MTP (as in
DeepSeek-R1's RL stages), and the main head's logits are unchanged by it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from torch import Tensor

from r1mega.models.builder import unwrap


@contextmanager
def mtp_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` (a GPTModel, possibly wrapped) without its MTP block inside the context."""
    inner = unwrap(model)
    config, saved = inner.config, (inner.config.mtp_num_layers, getattr(inner, "mtp_process", False))
    config.mtp_num_layers, inner.mtp_process = None, False
    try:
        yield
    finally:
        config.mtp_num_layers, inner.mtp_process = saved


def forward_logits(
    model: torch.nn.Module,
    input_ids: Tensor,
    position_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    gather: bool = True,
) -> Tensor:
    """Logits ``(b, s, V)`` of the main head for ``input_ids`` (b, s); differentiable.

    ``gather`` collects the vocabulary shards of tensor-parallel ranks (else each rank keeps its shard).
    Under pipeline parallelism (inside megatron's schedule, which sets the stage's input tensor), a stage other
    than the last returns its hidden states ``(s, b, hidden)`` for the next stage instead of logits.
    """
    device = next(model.parameters()).device
    input_ids = input_ids.to(device, non_blocking=True)  # no copy when already there
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=device)[None].expand_as(input_ids)
    position_ids = position_ids.to(device, non_blocking=True)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device, non_blocking=True)
    with mtp_disabled(model):
        logits = model(input_ids, position_ids, attention_mask)  # (b, s, V / tp)
    tp_group = unwrap(model).pg_collection.tp
    if gather and unwrap(model).post_process and tp_group.size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits, group=tp_group)
    return logits
