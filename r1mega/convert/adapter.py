"""The state-dict adapter contract, and the tensor reshapes the model families share.

An adapter converts between r1mega's parameters and a Hugging Face ``*ForCausalLM``'s, one tensor at a time:

* r1mega side: the *module names* of an unsharded megatron-core ``GPTModel`` (``model.state_dict()`` at
  TP = PP = EP = 1), e.g. ``decoder.layers.3.self_attention.linear_qkv.weight`` or
  ``decoder.layers.1.mlp.experts.local_experts.7.linear_fc1.weight``. These are layout-independent:
  ``r1mega.convert.megatron_io`` maps them to and from megatron's distributed-checkpoint keys, and
  dist-checkpointing reshards them into any TP/PP/EP layout.
* Hugging Face side: the names and layouts in the family's safetensors files.

``from_hf(name, source)`` builds one r1mega tensor from the Hugging Face tensors it needs (``source`` is a
lazy mapping, so only those are read); ``to_hf(name, tensor)`` returns the Hugging Face tensors one r1mega
tensor becomes. Both are pure (no I/O, no process groups) and work on ``meta`` tensors, which is how the
exporter plans its output files before reading any weight. ``model_config`` / ``hf_config`` translate the
architecture; anything a side cannot represent raises ``ConvertError`` with a sentence saying what and why.
"""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from r1mega.config.schema import ModelConfig
from r1mega.models.registry import ModelFamily


class ConvertError(ValueError):
    """A checkpoint or config that cannot be converted; the message says what and how to fix it."""


@dataclass(frozen=True)
class Rule:
    """How one r1mega tensor relates to Hugging Face tensors."""

    name: str
    """r1mega module name."""
    hf: tuple[str, ...]
    """The Hugging Face tensors it is made of (several for fused tensors)."""
    op: str = "copy"
    """The adapter method pair ``_<op>_from_hf`` / ``_<op>_to_hf`` that converts (``copy``: identity)."""
    copies: tuple[str, ...] = ()
    """Hugging Face names holding the same tensor again (DeepSeek's MTP layer repeats the embedding and
    output head): written on export, checked equal to ``hf[0]`` on import."""


class HFAdapter(ABC):
    """Base class of the per-family adapters; subclasses list their ``Rule``s and translate configs."""

    family: ClassVar[str]
    hf_architecture: ClassVar[str]
    hf_model_type: ClassVar[str]
    fp32_names: ClassVar[tuple[str, ...]] = ()
    """Hugging Face tensors kept in fp32 whatever the export dtype (regex fragments)."""

    def __init__(self, model: ModelConfig) -> None:
        if model.family != self.family:
            raise ConvertError(f"{type(self).__name__} converts model.family={self.family}, not {model.family}")
        self.m = model
        self.rules: dict[str, Rule] = {}
        self.groups: list[list[str]] = []
        """r1mega names by layer (embedding, each decoder layer, final norm and head, each MTP layer)."""
        for group in self._rule_groups():
            self.groups.append([r.name for r in group])
            self.rules.update((r.name, r) for r in group)

    # ------------------------------------------------------------------ to be provided per family
    @abstractmethod
    def _rule_groups(self) -> Iterator[list[Rule]]:
        """The conversion rules, one list per layer group (embedding, each decoder layer, head, MTP)."""

    @classmethod
    @abstractmethod
    def model_config(cls, hf: Mapping[str, Any], name: str) -> ModelConfig:
        """r1mega's ``ModelConfig`` for a Hugging Face ``config.json`` (as a dict)."""

    @classmethod
    def conventions(cls, hf: Mapping[str, Any]) -> dict[str, Any]:
        """Layout choices of a Hugging Face checkpoint that r1mega's model does not hold (constructor kwargs)."""
        return {}

    @abstractmethod
    def hf_config(self) -> dict[str, Any]:
        """Keyword arguments of the family's ``transformers`` config class for this model."""

    # ------------------------------------------------------------------ conversion
    def names(self) -> list[str]:
        """Every r1mega tensor, in layer order."""
        return [name for group in self.groups for name in group]

    def hf_names(self) -> list[str]:
        """Every Hugging Face tensor an export writes, in layer order."""
        return [h for name in self.names() for h in (*self.rules[name].hf, *self.rules[name].copies)]

    def rule(self, name: str) -> Rule:
        try:
            return self.rules[name]
        except KeyError:
            raise ConvertError(
                f"the {self.family} adapter has no Hugging Face counterpart for r1mega tensor {name!r}; "
                "the model config and the checkpoint disagree"
            ) from None

    def from_hf(self, name: str, source: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The r1mega tensor ``name``, built from the Hugging Face tensors in ``source`` it needs."""
        rule = self.rule(name)
        missing = [h for h in rule.hf if h not in source]
        if missing:
            raise ConvertError(
                f"the Hugging Face checkpoint lacks {', '.join(missing)} (needed for r1mega's {name}); "
                "it does not match its config.json"
            )
        tensors = [source[h] for h in rule.hf]
        for copy in rule.copies:
            if copy in source and not torch.equal(source[copy], tensors[0]):
                raise ConvertError(
                    f"{copy} differs from {rule.hf[0]}; r1mega's multi-token-prediction layers share the main "
                    "model's embedding and output head, so a checkpoint with separate ones cannot be represented"
                )
        return getattr(self, f"_{rule.op}_from_hf")(*tensors)

    def to_hf(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The Hugging Face tensors the r1mega tensor ``name`` becomes."""
        rule = self.rule(name)
        out = getattr(self, f"_{rule.op}_to_hf")(tensor)
        out = out if isinstance(out, tuple) else (out,)
        result = dict(zip(rule.hf, out, strict=True))
        result.update((copy, out[0]) for copy in rule.copies)
        return result

    def from_hf_state_dict(self, hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A whole r1mega state dict from a whole Hugging Face one (tests and small models)."""
        return {name: self.from_hf(name, hf) for name in self.names()}

    def to_hf_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A whole Hugging Face state dict from a whole r1mega one."""
        out: dict[str, torch.Tensor] = {}
        for name in self.names():
            out.update(self.to_hf(name, state[name]))
        return out

    def keeps_fp32(self, hf_name: str) -> bool:
        """Whether Hugging Face keeps this tensor in fp32 in any checkpoint dtype (DeepSeek's router)."""
        return any(re.search(p, hf_name) for p in self.fp32_names)

    # ------------------------------------------------------------------ shared tensor operations
    def _copy_from_hf(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def _copy_to_hf(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def _vocab_from_hf(self, t: torch.Tensor) -> torch.Tensor:
        """Embedding / output rows padded with zeros to the padded vocabulary."""
        # (vocab, hidden) -> (padded_vocab, hidden)
        pad = self.m.padded_vocab_size - t.shape[0]
        if pad < 0:
            raise ConvertError(
                f"the checkpoint has {t.shape[0]} vocabulary rows, more than model.vocab_size={self.m.vocab_size}"
            )
        return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t

    def _vocab_to_hf(self, t: torch.Tensor) -> torch.Tensor:
        return t[: self.m.vocab_size]

    def _glu_from_hf(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """megatron's SwiGLU ``linear_fc1`` is the gate projection stacked on the up projection."""
        return torch.cat([gate, up])  # (2 * ffn, hidden)

    def _glu_to_hf(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = t.chunk(2)
        return gate, up

    def _qkv_from_hf(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """megatron's fused QKV: per query group, that group's query heads, then its key, then its value."""
        groups, d = self.m.query_groups, self.m.head_dim
        rest = q.shape[1:]  # (hidden,) for weights, () for biases
        q = q.reshape(groups, -1, *rest)  # (groups, heads_per_group * d, ...)
        k = k.reshape(groups, d, *rest)
        v = v.reshape(groups, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)  # (groups * (heads_per_group + 2) * d, ...)

    def _qkv_to_hf(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        groups, d = self.m.query_groups, self.m.head_dim
        per_group = self.m.num_attention_heads // groups
        rest = t.shape[1:]
        t = t.reshape(groups, (per_group + 2) * d, *rest)
        q, k, v = t.split([per_group * d, d, d], dim=1)
        return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def adapter_class(family: ModelFamily) -> type[HFAdapter]:
    """The state-dict adapter class that the registry names for ``family`` (imports its module)."""
    module, _, name = family.adapter.partition(":")
    return getattr(importlib.import_module(module), name)


def model_fields(model: ModelConfig) -> dict[str, Any]:
    """Every field of a ``ModelConfig`` (what ``r1mega_overrides.txt`` and ``r1mega_convert.json`` hold)."""
    return {f.name: getattr(model, f.name) for f in fields(model)}


def rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings of a Hugging Face config in one form: ``rope_parameters`` (transformers 5) or the older
    ``rope_scaling`` + ``rope_theta`` (transformers 4, DeepSeek's own config.json), with ``rope_type`` set."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    params.pop("type", None)
    if "rope_theta" not in params:
        params["rope_theta"] = hf.get("rope_theta", 10000.0)
    return params


def vocab_divisor(vocab_size: int) -> int:
    """The largest power of two up to 128 dividing the vocabulary, so an import adds no padding rows."""
    divisor = 128
    while vocab_size % divisor:
        divisor //= 2
    return divisor


def require(condition: bool, message: str) -> None:
    """Raise ``ConvertError(message)`` unless ``condition``."""
    if not condition:
        raise ConvertError(message)
