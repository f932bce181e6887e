"""Model weights as a megatron-core distributed checkpoint (``torch_dist``), in any parallel layout.

Every tensor is saved under its global, layout-independent key with its shard's place in the whole,
so weights saved under TP=2 / PP=2 / EP=2 load under any other layout.

Before anything loads, ``check_loadable`` refuses in one line (``CheckpointError``, exit 2) a folder that is
missing, unreadable or not a checkpoint, files that fail the checksums of its ``meta.json``, and a checkpoint
of another model: it names the first tensor that is missing or has another shape, with both shapes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from r1mega.checkpoint import integrity
from r1mega.checkpoint.errors import CheckpointError
from r1mega.models.builder import unwrap
from r1mega.utils.logging import get_logger

log = get_logger(__name__)


def sharding_metadata(chunks: list[torch.nn.Module]) -> dict[str, object]:
    """What megatron-core's ``sharded_state_dict`` needs to know about the layout of ``chunks``.

    ``dp_cp_group``: the data x context parallel group the model was built with (its ``pg_collection``), over
    which replicated tensors are split for writing. ``non_homogeneous_layers``: layers are saved one by one
    (dense-first and MoE layers differ).
    """
    return {"dp_cp_group": unwrap(chunks[0]).pg_collection.dp_cp, "non_homogeneous_layers": True}


def sharded_model_state(chunks: list[torch.nn.Module]) -> dict[str, dict]:
    """One sharded state dict per model chunk, keyed ``model0``, ``model1``... (virtual stages)."""
    metadata = sharding_metadata(chunks)
    return {f"model{i}": unwrap(chunk).sharded_state_dict(metadata=metadata) for i, chunk in enumerate(chunks)}


def save_weights(chunks: list[torch.nn.Module], directory: str) -> None:
    """Save the model chunks of every rank into ``directory`` (collective: all ranks call it)."""
    os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded_model_state(chunks), directory)


def _folder_problem(path: Path) -> str | None:
    """Why ``path`` is no checkpoint folder that can be read, or None (local)."""
    if not path.exists():
        return f"cannot load weights from {path}: no such folder"
    if not path.is_dir():
        return f"cannot load weights from {path}: it is a file, not a checkpoint folder"
    if not os.access(path, os.R_OK | os.X_OK):
        return f"cannot load weights from {path}: permission denied"
    if not (path / "metadata.json").is_file():
        latest = path / "latest"
        hint = f"; it holds checkpoints: give {path / latest.read_text().strip()}" if latest.is_file() else ""
        return (
            f"cannot load weights from {path}: not a megatron-core distributed checkpoint (no metadata.json); "
            f"give a step_N folder or a folder written by r1mega-convert import{hint}"
        )
    return None


def _recorded_files(path: Path) -> tuple[integrity.Files | None, str | None]:
    """(``meta.json``'s file table or None, a problem or None) of a weights folder (local)."""
    try:
        return json.loads((path / integrity.META).read_text()).get("files"), None
    except (OSError, ValueError, AttributeError) as e:
        return None, f"{path / integrity.META} cannot be read ({e}); the checkpoint is damaged"


def _tensors(state: dict[str, Any]) -> Iterator[ShardedTensor]:
    """Every ``ShardedTensor`` of a sharded state dict, factories built (``state`` is left as it is)."""
    for value in nested_values(state):
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            yield from _tensors(built if isinstance(built, dict) else {"_": built})
        elif isinstance(value, ShardedTensor):
            yield value


def _saved_model(directory: str) -> str:
    """``; it was saved with model=<name> (family <family>)`` from its meta.json, or nothing (local)."""
    try:
        model = json.loads((Path(directory) / integrity.META).read_text())["config"]["model"]
        return f"; it was saved with model={model['name']} (family {model['family']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _shape_problem(state: dict[str, Any], directory: str) -> str | None:
    """The first tensor of ``state`` the checkpoint lacks, else the first it holds in another shape, as a
    sentence naming both shapes (local)."""
    try:
        saved = dist_checkpointing.load_tensors_metadata(directory)
    except Exception as e:  # whatever reading a damaged or foreign .metadata raises: say it in one line
        return f"cannot read the tensors of {directory}: {type(e).__name__}: {str(e).strip().splitlines()[0]}"
    tensors = list(_tensors(state))
    missing = [t.key for t in tensors if t.key not in saved]
    if missing:
        return (
            f"{directory} does not fit this model: it lacks tensor {missing[0]} ({len(missing)} of the model's "
            f"{len(tensors)} tensors are missing){_saved_model(directory)}: another model family or layer layout "
            "(check model.*)"
        )
    for tensor in tensors:
        then, now = tuple(saved[tensor.key].global_shape), tuple(tensor.global_shape)
        if then != now and not tensor.allow_shape_mismatch:
            return (
                f"{directory} does not fit this model: tensor {tensor.key} has shape {then} in the checkpoint, "
                f"{now} in the model{_saved_model(directory)} (check model.*)"
            )
    return None


def check_shapes(state: dict[str, Any], directory: str) -> None:
    """Raise ``CheckpointError`` on every rank when a tensor of ``state`` (this rank's sharded model state) is
    missing from ``directory`` or has another global shape there (collective)."""
    problem = integrity.first(_shape_problem(state, directory))
    if problem is not None:
        raise CheckpointError(problem)


def check_loadable(state: dict[str, Any], directory: str, verify: bool = True) -> None:
    """Refuse weights that cannot load into ``state`` with one ``CheckpointError`` naming the folder, file or
    tensor (collective: every rank raises, or none).

    In order: the folder exists and is a dist_checkpointing checkpoint; with ``verify``, every file matches the
    checksum its ``meta.json`` records (a folder without ``meta.json``, as ``r1mega-convert import`` and
    ``save_weights`` write, has none to check); every tensor of ``state`` is there in the same global shape.
    """
    path = Path(directory)
    problem = integrity.first(_folder_problem(path))
    if problem is not None:
        raise CheckpointError(problem)
    if verify and (path / integrity.META).is_file():
        files, problem = _recorded_files(path)
        problem = integrity.first(problem)
        if problem is not None:
            raise CheckpointError(problem)
        integrity.verify(path, files)
    elif verify:
        log.info("%s has no %s: no checksums to verify", path, integrity.META)
    check_shapes(state, directory)


def load_weights(chunks: list[torch.nn.Module], directory: str, strict: bool = True, verify: bool = True) -> None:
    """Load weights saved under any layout into this rank's chunks (collective).

    ``check_loadable`` runs first: nothing is read from a folder that fails it (``verify``: the checksums).
    """
    check_loadable(sharded_model_state(chunks), directory, verify)
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
