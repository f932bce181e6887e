"""Hugging Face ``Qwen2ForCausalLM`` <-> r1mega ``qwen2`` family: Llama's layout plus biases on q, k and v.

The biases fuse like the weights (per key/value group: the group's query heads, its key, its value).
Sliding-window attention and RoPE scaling (which Qwen2.5 configs leave off) cannot be represented.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from r1mega.config.schema import ModelConfig
from r1mega.convert.adapter import Rule, require, rope_parameters
from r1mega.convert.llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"
    hf_architecture = "Qwen2ForCausalLM"
    hf_model_type = "qwen2"

    def _attention_rules(self, r1: str, hf: str) -> list[Rule]:
        attn = f"{hf}self_attn."
        bias = tuple(f"{attn}{p}_proj.bias" for p in "qkv")
        return [*super()._attention_rules(r1, hf), Rule(f"{r1}self_attention.linear_qkv.bias", bias, "qkv")]

    @classmethod
    def model_config(cls, hf: Mapping[str, Any], name: str) -> ModelConfig:
        require(
            not hf.get("use_sliding_window", False),
            "Qwen2ForCausalLM with use_sliding_window=true: r1mega's attention has no sliding window",
        )
        rope = rope_parameters(hf)
        require(
            rope["rope_type"] == "default",
            f"Qwen2 RoPE type {rope['rope_type']!r} cannot be represented: r1mega's qwen2 family uses plain RoPE",
        )
        return ModelConfig(name=name, family=cls.family, add_qkv_bias=True, **cls._dense_fields(hf))

    def hf_config(self) -> dict[str, Any]:
        m = self.m
        require(m.add_qkv_bias, "Qwen2ForCausalLM always has q/k/v biases; set model.add_qkv_bias=true")
        require(m.rope_scaling is None, f"model.rope_scaling={m.rope_scaling} cannot be exported as Qwen2ForCausalLM")
        require(not m.is_moe and not m.multi_latent_attention, "an MoE or MLA model cannot be exported as Qwen2")
        return dict(
            self._dense_hf_config(),
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=m.num_layers,
            rope_parameters={"rope_type": "default", "rope_theta": m.rotary_base},
        )
