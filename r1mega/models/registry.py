"""One registry entry per model family: presets, the Hugging Face architecture, and its state-dict adapter.

A lookup miss lists the valid names. The adapter is named, not imported, so that reading the registry stays
free of torch (``r1mega-check`` validates configs without it) and models stay below ``r1mega.convert``, which
resolves the name (``r1mega.convert.adapter.adapter_class``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    """What r1mega knows about one architecture family."""

    name: str
    hf_architecture: str
    """``architectures[0]`` in a Hugging Face ``config.json``."""
    hf_model_type: str
    """``model_type`` in a Hugging Face ``config.json``."""
    presets: tuple[str, ...]
    """``conf/model/`` presets of this family."""
    adapter: str
    """The Hugging Face state-dict adapter (``r1mega.convert``), as ``module:Class``."""


FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily(
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            "deepseek_v3",
            ("dsv3_tiny", "deepseek_v3"),
            "r1mega.convert.deepseek_v3:DeepseekV3Adapter",
        ),
        ModelFamily(
            "qwen2",
            "Qwen2ForCausalLM",
            "qwen2",
            ("qwen2_tiny", "qwen2_5_1_5b", "qwen2_5_7b", "qwen2_5_14b", "qwen2_5_32b"),
            "r1mega.convert.qwen2:Qwen2Adapter",
        ),
        ModelFamily(
            "llama",
            "LlamaForCausalLM",
            "llama",
            ("llama_tiny", "llama3_1_8b", "llama3_3_70b"),
            "r1mega.convert.llama:LlamaAdapter",
        ),
    )
}


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; an unknown name raises with the valid ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; valid: {', '.join(sorted(FAMILIES))}") from None


def family_for_hf_model_type(model_type: str) -> ModelFamily:
    """The family whose Hugging Face ``model_type`` is ``model_type``; a miss lists the supported ones."""
    for family in FAMILIES.values():
        if family.hf_model_type == model_type:
            return family
    supported = ", ".join(sorted(f.hf_model_type for f in FAMILIES.values()))
    raise KeyError(f"no r1mega model family for Hugging Face model_type {model_type!r}; supported: {supported}")
