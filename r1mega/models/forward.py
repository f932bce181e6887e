"""The training forward that returns logits rather than the language-model loss.

GRPO, evaluation of log-probabilities and parity tests need logits. megatron-core 0.16.1's ``GPTModel``
with multi-token prediction requires labels in every forward (it clones them for the MTP loss) and then
returns the loss, not logits. :func:`forward_logits` switches the MTP block off for the call (the main
head's logits are unchanged by it); :func:`forward_logits_mtp` keeps it on and returns every head's logits,
for a caller that trains MTP with its own loss (GRPO's ``grpo.mtp_loss_coef``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
from megatron.core.transformer.transformer_config import TransformerConfig
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
    return _gathered(model, logits, gather)


def _gathered(model: torch.nn.Module, logits: Tensor, gather: bool) -> Tensor:
    """``logits`` with the vocabulary shards of the model's tensor-parallel ranks collected (when ``gather``)."""
    tp_group = unwrap(model).pg_collection.tp
    if gather and unwrap(model).post_process and tp_group.size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits, group=tp_group)
    return logits


def forward_logits_mtp(
    model: torch.nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor,
    gather: bool = True,
    train_trunk: bool = True,
) -> tuple[Tensor, list[Tensor]]:
    """Main-head logits ``(b, s, V)`` and each MTP depth's logits ``[(b, s, V)] * mtp_num_layers`` from one
    forward with the MTP block on; differentiable (gradients reach the MTP block and, unless ``train_trunk`` is
    False, through its input the decoder).

    Depth ``k``'s logits at position ``t`` predict ``labels[t + k]``. megatron puts its own MTP loss into the
    graph (scaled by ``mtp_loss_scaling_factor``); the factor is 0 for the call, so the caller's loss on the
    returned logits is the only MTP term. The logits are read from the output layer, which megatron calls once
    per MTP depth and then once for the main head (megatron's own losses get a copy: its cross entropy works in
    place). A pipeline stage other than the last returns its hidden states and no MTP logits.

    ``train_trunk=False`` detaches the decoder's output where the first MTP layer takes it, so a loss on the MTP
    logits trains the MTP block (and the embedding and output layer it shares with the main model) but sends no
    gradient into the decoder layers; the main head's logits and their gradients are unchanged.
    """
    device = next(model.parameters()).device
    input_ids, position_ids, labels = (t.to(device, non_blocking=True) for t in (input_ids, position_ids, labels))
    if attention_mask is not None:
        attention_mask = attention_mask.to(device, non_blocking=True)
    inner = unwrap(model)
    if inner.config.mtp_num_layers is None:
        raise ValueError("forward_logits_mtp needs a model with MTP layers (model.mtp_num_layers >= 1)")
    _fit_moe_tracker(inner.config)
    captured: list[Tensor] = []

    def keep(_module: torch.nn.Module, _args: Any, out: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor | None]:
        captured.append(out[0])
        return out[0].clone(), out[1]  # megatron's cross entropy shifts its input in place: give it a copy

    def detach(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

    hooks = []
    if inner.post_process:
        hooks.append(inner.output_layer.register_forward_hook(keep))
    if not train_trunk and getattr(inner, "mtp", None) is not None:
        hooks.append(inner.mtp.layers[0].register_forward_pre_hook(detach, with_kwargs=True))
    scale, inner.config.mtp_loss_scaling_factor = inner.config.mtp_loss_scaling_factor, 0.0
    try:
        out = model(input_ids, position_ids, attention_mask, labels=labels)
    finally:
        inner.config.mtp_loss_scaling_factor = scale
        for hook in hooks:
            hook.remove()
    if not inner.post_process:
        return out, []
    heads = [_gathered(model, z.transpose(0, 1), gather) for z in captured]  # (s, b, V/tp) -> (b, s, V)
    return heads[-1], heads[:-1]


def _fit_moe_tracker(config: TransformerConfig) -> None:
    """Make room in megatron's per-layer MoE aux-loss log for the MTP layers: a forward without MTP (``mtp_disabled``)
    creates it with one slot per decoder layer, and the MTP layer's router then writes past its end."""
    need = config.num_layers + (config.mtp_num_layers or 0)
    for entry in get_moe_layer_wise_logging_tracker().values():
        values = entry.get("values")
        if values is not None and values.numel() < need:
            entry["values"] = torch.cat([values, values.new_zeros(need - values.numel())])
