"""Hugging Face ``LlamaForCausalLM`` <-> r1mega ``llama`` family (dense GQA students, llama3 RoPE scaling).

Hugging Face keeps q/k/v and gate/up as separate projections; megatron-core fuses them (``linear_qkv``
grouped per key/value head, ``linear_fc1`` = gate stacked on up). Both sides use the rotate-half RoPE
layout (transformers already undid Meta's interleaved q/k order), so no rotary permutation is needed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from r1mega.config.schema import ModelConfig
from r1mega.convert.adapter import HFAdapter, Rule, require, rope_parameters, vocab_divisor

LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""megatron-core 0.16.1 applies llama3 RoPE scaling with these values (only the factor is configurable)."""


class LlamaAdapter(HFAdapter):
    family = "llama"
    hf_architecture = "LlamaForCausalLM"
    hf_model_type = "llama"

    def _attention_rules(self, r1: str, hf: str) -> list[Rule]:
        attn = f"{hf}self_attn."
        return [
            Rule(
                f"{r1}self_attention.linear_qkv.weight",
                (f"{attn}q_proj.weight", f"{attn}k_proj.weight", f"{attn}v_proj.weight"),
                "qkv",
            ),
            Rule(f"{r1}self_attention.linear_proj.weight", (f"{attn}o_proj.weight",)),
        ]

    def _rule_groups(self) -> Iterator[list[Rule]]:
        yield [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
        for i in range(self.m.num_layers):
            r1, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
            yield [
                Rule(f"{r1}input_layernorm.weight", (f"{hf}input_layernorm.weight",)),
                *self._attention_rules(r1, hf),
                Rule(f"{r1}pre_mlp_layernorm.weight", (f"{hf}post_attention_layernorm.weight",)),
                Rule(f"{r1}mlp.linear_fc1.weight", (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"), "glu"),
                Rule(f"{r1}mlp.linear_fc2.weight", (f"{hf}mlp.down_proj.weight",)),
            ]
        last = [Rule("decoder.final_layernorm.weight", ("model.norm.weight",))]
        if not self.m.tie_word_embeddings:
            last.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab"))
        yield last

    # ------------------------------------------------------------------ configs
    @classmethod
    def _dense_fields(cls, hf: Mapping[str, Any]) -> dict[str, Any]:
        """The ``ModelConfig`` fields Llama and Qwen2 share."""
        arch = cls.hf_architecture
        require(
            hf.get("hidden_act", "silu") == "silu",
            f"{arch} with hidden_act={hf.get('hidden_act')!r}: r1mega's MLP is SwiGLU (silu)",
        )
        require(not hf.get("mlp_bias", False), f"{arch} with mlp_bias=true: r1mega's MLP has no biases")
        require(
            hf.get("partial_rotary_factor", 1.0) == 1.0, f"{arch} with partial_rotary_factor<1 cannot be represented"
        )
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        head_dim = hf.get("head_dim") or hidden // heads
        rope = rope_parameters(hf)
        return dict(
            num_layers=hf["num_hidden_layers"],
            hidden_size=hidden,
            ffn_hidden_size=hf["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            kv_channels=None if head_dim * heads == hidden else head_dim,
            vocab_size=hf["vocab_size"],
            make_vocab_size_divisible_by=vocab_divisor(hf["vocab_size"]),
            max_position_embeddings=hf["max_position_embeddings"],
            norm_epsilon=hf["rms_norm_eps"],
            init_method_std=hf.get("initializer_range", 0.02),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rotary_base=float(rope["rope_theta"]),
        )

    @classmethod
    def model_config(cls, hf: Mapping[str, Any], name: str) -> ModelConfig:
        require(
            not hf.get("attention_bias", False),
            "LlamaForCausalLM with attention_bias=true: r1mega's Llama has no attention biases (Qwen2-style q/k/v biases need model_type qwen2)",
        )
        rope = rope_parameters(hf)
        fields = cls._dense_fields(hf)
        if rope["rope_type"] == "llama3":
            for key, value in LLAMA3_FIXED.items():
                require(
                    float(rope.get(key, value)) == value,
                    f"llama3 RoPE scaling with {key}={rope.get(key)}: megatron-core 0.16.1 supports only "
                    + ", ".join(f"{k}={v:g}" for k, v in LLAMA3_FIXED.items()),
                )
            fields.update(rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]))
        else:
            require(
                rope["rope_type"] == "default",
                f"Llama RoPE type {rope['rope_type']!r} cannot be represented: r1mega's dense models support default RoPE and llama3 scaling",
            )
        return ModelConfig(name=name, family=cls.family, **fields)

    def _dense_hf_config(self) -> dict[str, Any]:
        m = self.m
        return dict(
            hidden_size=m.hidden_size,
            intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.query_groups,
            head_dim=m.head_dim,
            vocab_size=m.vocab_size,
            max_position_embeddings=m.max_position_embeddings,
            rms_norm_eps=m.norm_epsilon,
            initializer_range=m.init_method_std,
            tie_word_embeddings=m.tie_word_embeddings,
            hidden_act="silu",
        )

    def hf_config(self) -> dict[str, Any]:
        m = self.m
        require(
            not m.add_qkv_bias,
            "model.add_qkv_bias=true cannot be exported as LlamaForCausalLM (its attention_bias also adds an output bias); use model.family=qwen2",
        )
        require(
            not m.is_moe and not m.multi_latent_attention, "an MoE or MLA model cannot be exported as LlamaForCausalLM"
        )
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rotary_base}
        if m.rope_scaling == "llama3":
            rope.update(rope_type="llama3", factor=m.rope_scaling_factor, **LLAMA3_FIXED)
        return dict(self._dense_hf_config(), attention_bias=False, mlp_bias=False, rope_parameters=rope)
