"""The r1mega side on disk: megatron-core distributed checkpoints (``torch_dist``) written and read a tensor at a time.

Checkpoint keys are the unsharded module names, except that a layer's routed experts are one stacked tensor
(``...mlp.experts.experts.linear_fc1.weight``, experts first), and Transformer Engine layer specs fuse some
norms into the next linear (``...linear_qkv.layer_norm_weight`` for ``input_layernorm.weight``).
``checkpoint_location`` / ``module_name`` translate.

Writing (import): the model is built on the ``meta`` device in the target layout, so megatron-core itself
produces every key, shard and object of the checkpoint; ``StreamingSave`` then asks a ``fill`` function for
each shard's data only when the writer reaches it (torch's serial writer), and cuts the rank's data into files
of about ``FILE_BYTES``: torch's writer keeps each tensor of a file until the file is closed, so the file size
bounds what an import holds.
Reading (export): ``CheckpointReader`` loads one tensor, or one expert of a stacked tensor, by key.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, SavePlan, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.futures import Future

from r1mega.convert.adapter import ConvertError

_EXPERTS = re.compile(r"^(?P<layer>.*\.mlp\.experts\.)experts\.(?P<param>linear_fc[12]\.weight)$")
_LOCAL_EXPERT = re.compile(
    r"^(?P<layer>.*\.mlp\.experts\.)local_experts\.(?P<e>\d+)\.(?P<param>linear_fc[12]\.weight)$"
)
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
}
"""Checkpoint keys of Transformer Engine layer specs (norm fused into the next linear) -> local module names."""

Fill = Callable[[str], torch.Tensor]
"""Module name -> the whole (unsharded) tensor."""
FILE_BYTES = 256 * 2**20
"""Data per checkpoint file written by an import (a file holds at least one tensor shard)."""


def checkpoint_location(name: str) -> tuple[str, int | None]:
    """Where a module's tensor lives in a checkpoint: (key, expert index in the stacked tensor or None)."""
    match = _LOCAL_EXPERT.match(name)
    if match:
        return f"{match['layer']}experts.{match['param']}", int(match["e"])
    return name, None


def module_name(key: str, expert: int | None = None) -> str:
    """The module name of checkpoint ``key`` (of expert ``expert`` for stacked expert tensors)."""
    match = _EXPERTS.match(key)
    if match:
        if expert is None:
            raise ValueError(f"{key} stacks experts; say which")
        return f"{match['layer']}local_experts.{expert}.{match['param']}"
    for te, local in TE_ALIASES.items():
        if key.endswith(te):
            return key[: -len(te)] + local
    return key


# ---------------------------------------------------------------------------------------------- writing
def build_meta_model(cfg: object) -> list[torch.nn.Module]:
    """The model chunks of this rank's layout on the ``meta`` device: every parameter's shape, no memory."""
    from r1mega.models.builder import build_model, transformer_config

    config = transformer_config(cfg)
    config.perform_initialization = False
    with torch.device("meta"):
        return build_model(cfg, config)


class _ShardFiller:
    """Cuts checkpoint shards out of whole module tensors, keeping the last few tensors for the next shards."""

    def __init__(self, fill: Fill, keep: int = 2) -> None:
        self.fill = fill
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.keep = keep

    def module(self, name: str) -> torch.Tensor:
        if name not in self.cache:
            self.cache[name] = self.fill(name)
            while len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        return self.cache[name]

    def __call__(self, key: str, offsets: tuple[int, ...], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if _EXPERTS.match(key):  # (experts, out, in): one module tensor per expert
            parts = [
                self._cut(self.module(module_name(key, e)), offsets[1:], shape[1:])
                for e in range(offsets[0], offsets[0] + shape[0])
            ]
            out = torch.stack(parts)
        else:
            out = self._cut(self.module(module_name(key)), offsets, shape)
        return out.to(dtype).clone()  # a shard of its own, not a view keeping the whole tensor alive

    @staticmethod
    def _cut(t: torch.Tensor, offsets: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        if t.dim() != len(shape):
            raise ConvertError(f"a tensor of shape {tuple(t.shape)} was expected to have {len(shape)} dimensions")
        for dim, (start, length) in enumerate(zip(offsets, shape, strict=True)):
            t = t.narrow(dim, start, length)
        return t


def _lazy_planner(filler: _ShardFiller, **kwargs: object) -> object:
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    class LazySavePlanner(MCoreSavePlanner):
        """megatron-core's save planner, with each tensor's data made when the writer asks for it."""

        def resolve_data(self, write_item: WriteItem) -> object:
            data = super().resolve_data(write_item)
            if write_item.type == WriteItemType.BYTE_IO:
                return data
            index = write_item.index
            return filler(index.fqn, tuple(index.offset), tuple(data.shape), data.dtype)

    return LazySavePlanner(**kwargs)


class _BoundedFileWriter(FileSystemWriter):
    """torch's serial ``FileSystemWriter``, writing a rank's items into files of about ``file_bytes`` each."""

    def __init__(self, path: str, file_bytes: int) -> None:
        super().__init__(path, thread_count=1, single_file_per_rank=True)
        self.file_bytes = file_bytes

    def write_data(self, plan: SavePlan, planner: object) -> Future:
        buckets: list[list[WriteItem]] = [[]]
        size = 0
        for item in plan.items:
            data = item.tensor_data
            nbytes = math.prod(data.size) * data.properties.dtype.itemsize if data is not None else 0
            if buckets[-1] and size + nbytes > self.file_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(item)
            size += nbytes
        prefix = plan.storage_data.prefix
        results = [
            super(_BoundedFileWriter, self)
            .write_data(replace(plan, items=bucket, storage_data=_StoragePrefix(f"{prefix}{i}_")), planner)
            .wait()
            for i, bucket in enumerate(buckets)
        ]
        done: Future = Future()
        done.set_result([r for result in results for r in result])
        return done


def streaming_save_strategy(fill: Fill, file_bytes: int = FILE_BYTES) -> object:
    """A megatron-core save strategy writing ``torch_dist`` checkpoints whose tensor data comes from ``fill``."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class StreamingSave(TorchDistSaveShardedStrategy):
        """megatron's torch_dist format through torch's serial writer: one shard resolved at a time."""

        def save(self, sharded_state_dict: dict, checkpoint_dir: object) -> None:
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            planner = _lazy_planner(
                _ShardFiller(fill), dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
            )
            writer = _BoundedFileWriter(str(checkpoint_dir), file_bytes)
            dcp.save(mcore_to_pyt_state_dict(state, False), storage_writer=writer, planner=planner)

    return StreamingSave("torch_dist", 1, thread_count=1)


def write_checkpoint(chunks: list[torch.nn.Module], directory: str | os.PathLike, fill: Fill) -> None:
    """Save ``chunks`` (meta or real) as a megatron-core checkpoint with data from ``fill`` (collective)."""
    from megatron.core import dist_checkpointing

    from r1mega.checkpoint.weights import sharded_model_state

    os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded_model_state(chunks), str(directory), sharded_strategy=streaming_save_strategy(fill))


# ---------------------------------------------------------------------------------------------- reading
class _BoxPlanner(DefaultLoadPlanner):
    """Loads one box (offsets + shape) of one checkpoint tensor into ``target``."""

    def __init__(self, key: str, offsets: tuple[int, ...], target: torch.Tensor) -> None:
        super().__init__()
        self.key, self.offsets, self.target = key, offsets, target

    def create_local_plan(self) -> LoadPlan:
        chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.target.shape)
        items = create_read_items_for_chunk_list(self.key, self.metadata.state_dict_metadata[self.key], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        t = self.target
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            t = t.narrow(dim, start, length)
        return t

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


class _CachedReader(FileSystemReader):
    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._metadata = super().read_metadata()

    def read_metadata(self) -> object:
        return self._metadata


class CheckpointReader:
    """Tensors of a megatron-core ``torch_dist`` checkpoint by module name, one at a time (no process group)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        if not os.path.isfile(os.path.join(directory, ".metadata")):
            raise ConvertError(f"{directory} is not a megatron-core torch_dist checkpoint (no .metadata file)")
        self.reader = _CachedReader(directory)
        tensors = self.reader.read_metadata().state_dict_metadata
        self.shapes = {
            k: (tuple(v.size), v.properties.dtype) for k, v in tensors.items() if isinstance(v, TensorStorageMetadata)
        }
        self._keys = {module_name(k): k for k in self.shapes if not _EXPERTS.match(k)}

    def _location(self, name: str) -> tuple[str, int | None]:
        key, expert = checkpoint_location(name)
        if expert is None:
            key = self._keys.get(name, key)
        if key not in self.shapes:
            raise ConvertError(f"the checkpoint has no tensor for {name} (looked for {key})")
        return key, expert

    def __contains__(self, name: str) -> bool:
        try:
            self._location(name)
        except ConvertError:
            return False
        return True

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of module ``name``'s tensor."""
        key, expert = self._location(name)
        shape, dtype = self.shapes[key]
        return (shape[1:] if expert is not None else shape), dtype

    def read(self, name: str) -> torch.Tensor:
        """Module ``name``'s whole tensor (one expert's slice of a stacked expert tensor)."""
        key, expert = self._location(name)
        shape, dtype = self.shapes[key]
        offsets = (0,) * len(shape)
        if expert is not None:
            shape, offsets = (1, *shape[1:]), (expert,) + offsets[1:]
        target = torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # "torch.distributed is disabled ... load in a single process": intended
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({key: target}, storage_reader=self.reader, planner=_BoxPlanner(key, offsets, target), no_dist=True)
        return target[0] if expert is not None else target
