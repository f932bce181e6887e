"""One registry entry per model family: presets, the Hugging Face architecture, and (later) its adapter.

A lookup miss lists the valid names.
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


FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek_v3", ("dsv3_tiny", "deepseek_v3")),
        ModelFamily(
            "qwen2",
            "Qwen2ForCausalLM",
            "qwen2",
            ("qwen2_tiny", "qwen2_5_1_5b", "qwen2_5_7b", "qwen2_5_14b", "qwen2_5_32b"),
        ),
        ModelFamily("llama", "LlamaForCausalLM", "llama", ("llama_tiny", "llama3_1_8b", "llama3_3_70b")),
    )
}


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; an unknown name raises with the valid ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; valid: {', '.join(sorted(FAMILIES))}") from None
