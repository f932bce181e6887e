"""Model weights as a megatron-core distributed checkpoint (``torch_dist``), in any parallel layout.

Every tensor is saved under its global, layout-independent key with its shard's place in the whole,
so weights saved under TP=2 / PP=2 / EP=2 load under any other layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from megatron.core import dist_checkpointing, parallel_state

from r1mega.models.builder import unwrap


def sharding_metadata() -> dict[str, object]:
    """What megatron-core's ``sharded_state_dict`` needs to know about the layout.

    ``non_homogeneous_layers``: layers are saved one by one (dense-first and MoE layers differ).
    """
    return {
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
        "non_homogeneous_layers": True,
    }


def sharded_model_state(chunks: list[torch.nn.Module]) -> dict[str, dict]:
    """One sharded state dict per model chunk, keyed ``model0``, ``model1``... (virtual stages)."""
    metadata = sharding_metadata()
    return {f"model{i}": unwrap(chunk).sharded_state_dict(metadata=metadata) for i, chunk in enumerate(chunks)}


def save_weights(chunks: list[torch.nn.Module], directory: str) -> None:
    """Save the model chunks of every rank into ``directory`` (collective: all ranks call it)."""
    os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded_model_state(chunks), directory)


def load_weights(chunks: list[torch.nn.Module], directory: str, strict: bool = True) -> None:
    """Load weights saved under any layout into this rank's chunks (collective)."""
    loaded = dist_checkpointing.load(sharded_model_state(chunks), directory)
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=strict)


def map_parameters(chunks: list[torch.nn.Module], fn: Callable[[str, torch.nn.Parameter], torch.Tensor | None]) -> None:
    """Replace each parameter's data by ``fn(name, param)`` where it returns a tensor (used by tests and tools)."""
    with torch.no_grad():
        for chunk in chunks:
            for name, param in unwrap(chunk).named_parameters():
                value = fn(name, param)
                if value is not None:
                    param.copy_(value)
