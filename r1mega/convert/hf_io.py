"""The Hugging Face side on disk: safetensors read one tensor at a time, written without buffering, and the
``config.json`` / ``generation_config.json`` / tokenizer files around them.

Reading opens the file for each tensor (``safe_open``), so no memory map outlives the tensor it served and
the process holds only what is being converted. DeepSeek's FP8 release format (``float8_e4m3fn`` weights
with a ``<name>_scale_inv`` per 128 x 128 block) is dequantized to bf16 on the way, as DeepSeek's
``fp8_cast_bf16.py`` does. Writing plans every shard's header from names, shapes and dtypes first and then
writes each tensor at its offset as it arrives, so an export never holds more than the tensors in hand.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from r1mega.convert.adapter import ConvertError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}
"""DeepSeek-R1's recommended sampling (its model card: temperature 0.6, top-p 0.95)."""

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a Hugging Face model folder, with transformers' defaults filled in."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConvertError(f"{directory} has no config.json; pass a Hugging Face model folder")
    raw = json.loads(path.read_text())
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**raw).to_dict()
    except ValueError as e:
        raise ConvertError(f"{path}: transformers cannot read it ({e})") from e


def read_header(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The tensor entries (dtype, shape, data_offsets) of a safetensors file, from its JSON header."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: Sequence[int] = (128, 128)) -> torch.Tensor:
    """A block-quantized FP8 weight as bf16: each ``block`` tile multiplied by its ``scale_inv`` entry."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * scale).to(torch.bfloat16)  # (rows, cols)


class SafetensorsSource(Mapping[str, torch.Tensor]):
    """The tensors of a Hugging Face checkpoint folder as a lazy mapping: each lookup reads one tensor."""

    def __init__(self, directory: str | os.PathLike, block: Sequence[int] = (128, 128)) -> None:
        self.dir = Path(directory)
        self.block = tuple(block)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        self._info: dict[str, tuple[str, str, list[int]]] = {}
        """name -> (file, safetensors dtype, shape), from the file headers."""
        for file in files:
            for name, entry in read_header(self.dir / file).items():
                self._info[name] = (file, entry["dtype"], entry["shape"])
        if not self._info:
            raise ConvertError(f"{self.dir} holds no .safetensors weights")
        self._names = [n for n in self._info if not n.endswith("_scale_inv")]
        self.used: set[str] = set()
        """Names looked up so far (to report tensors a conversion left unused)."""

    def _read(self, name: str) -> torch.Tensor:
        # A handle per tensor: its memory map (and the pages it touched) goes when the tensor is copied out.
        with safe_open(self.dir / self._info[name][0], "pt") as f:
            return f.get_tensor(name)

    def dtype(self, name: str) -> torch.dtype:
        """The dtype ``name`` is served in (bf16 for FP8 weights), without reading it."""
        stored = self._info[name][1]
        return torch.bfloat16 if stored.startswith("F8") else getattr(torch, _TORCH_NAMES[stored])

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self:
            raise KeyError(name)
        self.used.add(name)
        tensor = self._read(name)
        if tensor.dtype in _FP8:
            scale = f"{name}_scale_inv"
            if scale not in self._info:
                raise ConvertError(f"{name} is FP8 but the checkpoint has no {scale} to dequantize it with")
            tensor = dequantize_fp8(tensor, self._read(scale), self.block)
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self._info and not str(name).endswith("_scale_inv")

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``5GB``, ``500MB`` or ``1000000``."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


class SafetensorsWriter:
    """Writes planned tensors into ``model-0000i-of-0000N.safetensors`` shards plus the index, in any order.

    ``plan`` lists (name, shape, dtype) of every tensor; shards are cut in plan order at ``max_shard_bytes``.
    Each shard's header is written at once and each tensor lands at its offset when ``write`` gets it.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int,
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        count = len(shards)
        self.where: dict[str, tuple[Path, int, int, tuple[int, ...], torch.dtype]] = {}
        self.weight_map: dict[str, str] = {}
        self.total = 0
        for i, shard in enumerate(shards):
            path = self.dir / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype in shard:
                nbytes = math.prod(shape) * dtype.itemsize
                header[name] = {
                    "dtype": _DTYPES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(8 + len(raw) + offset)
            for name, shape, dtype in shard:
                begin, end = header[name]["data_offsets"]
                self.where[name] = (path, 8 + len(raw) + begin, end - begin, shape, dtype)
                self.weight_map[name] = path.name
            self.total += offset
        self.pending = set(self.where)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Put one planned tensor in its place."""
        try:
            path, offset, _, shape, dtype = self.where[name]
        except KeyError:
            raise ConvertError(f"{name} was not in the export plan") from None
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConvertError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # (nbytes,)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(memoryview(data))
        self.pending.discard(name)

    def close(self) -> None:
        """Write the index; fails if a planned tensor never came."""
        if self.pending:
            raise ConvertError(f"{len(self.pending)} planned tensors were not written, e.g. {sorted(self.pending)[:3]}")
        index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_hf_config(directory: str | os.PathLike, model_type: str, architecture: str, fields: dict[str, Any]) -> None:
    """``config.json`` through the installed transformers' own config class (so its format and defaults)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **fields)
    config.architectures = [architecture]
    config.save_pretrained(str(directory))


def write_generation_config(
    directory: str | os.PathLike, bos_token_id: int | None, eos_token_id: int | list[int] | None
) -> None:
    """``generation_config.json`` with R1's recommended sampling."""
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **GENERATION).save_pretrained(str(directory))


def copy_tokenizer(source: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files of ``source`` (a folder, or one tokenizer.json) to ``target``; returns their names."""
    source = Path(source)
    files = [source] if source.is_file() else [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    for file in files:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, Path(target) / file.name)
    return [file.name for file in files]
