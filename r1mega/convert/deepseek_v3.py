"""Hugging Face ``DeepseekV3ForCausalLM`` <-> r1mega ``deepseek_v3`` family (MLA + MoE + MTP).

What maps to what:

* MLA: ``q_a_proj``/``q_a_layernorm``/``q_b_proj`` (or ``q_proj`` without q-LoRA) -> ``linear_q_down_proj``/
  ``q_layernorm``/``linear_q_up_proj`` (``linear_q_proj``); ``kv_a_proj_with_mqa``/``kv_a_layernorm``/``kv_b_proj``
  -> ``linear_kv_down_proj``/``kv_layernorm``/``linear_kv_up_proj``. Per-head layouts agree ([nope, rope] for q,
  [nope-key, value] for kv_b). RoPE: megatron-core's MLA reads the RoPE dimensions as DeepSeek stores them,
  interleaved pairs ``(x0, x1), (x2, x3)...`` (it de-interleaves them before rotating halves), which is
  transformers' ``rope_interleave=true``: those weights copy unchanged. A checkpoint with ``rope_interleave=false``
  (rotate-half order) gets the RoPE rows of ``q_b_proj`` (per head) and ``kv_a_proj_with_mqa`` interleaved on
  import and de-interleaved on export.
* MoE: ``gate.weight`` -> ``router.weight``, ``gate.e_score_correction_bias`` -> ``router.expert_bias``
  (aux-loss-free balancing), ``experts.{e}.{gate,up,down}_proj`` -> ``experts.local_experts.{e}.linear_fc1/2``,
  ``shared_experts.*`` -> ``shared_experts.*``; the first ``first_k_dense_replace`` layers keep a dense MLP.
* MTP: DeepSeek's layer ``num_hidden_layers + k`` (layer 61 in V3/R1: ``enorm``, ``hnorm``, ``eh_proj``,
  ``shared_head.norm``, a full decoder layer, and copies of the embedding and output head) -> megatron's
  ``mtp.layers.{k}``. Kept in both directions (DeepSeek's own convert.py drops it).

Routing semantics that must agree (checked in ``model_config``/``hf_config``): sigmoid scores, top-k weights
normalised (megatron always normalises sigmoid top-k), group scores from the top-2 experts of each group
(megatron uses top-(k / topk_group), so k = 2 x topk_group when routing is group-limited).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from r1mega.config.schema import ModelConfig
from r1mega.convert.adapter import HFAdapter, Rule, require, rope_parameters, vocab_divisor


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class DeepseekV3Adapter(HFAdapter):
    family = "deepseek_v3"
    hf_architecture = "DeepseekV3ForCausalLM"
    hf_model_type = "deepseek_v3"
    fp32_names = (r"\.mlp\.gate\.weight$", r"\.e_score_correction_bias$")

    def __init__(self, model: ModelConfig, rope_interleave: bool = True) -> None:
        self.rope_interleave = rope_interleave
        super().__init__(model)
        rope = model.qk_pos_emb_head_dim
        # megatron applies RoPE to dims [0, 2, 4, ..., 1, 3, 5, ...] of its rows (de-interleaving them).
        halves = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])
        to_r1 = torch.arange(rope) if rope_interleave else torch.argsort(halves)
        self._perm, self._inverse = to_r1, torch.argsort(to_r1)  # Hugging Face rows -> megatron rows, and back

    # ------------------------------------------------------------------ rules
    def _layer_rules(self, r1: str, hf: str, moe: bool) -> list[Rule]:
        a, s = f"{hf}self_attn.", f"{r1}self_attention."
        rules = [Rule(f"{r1}input_layernorm.weight", (f"{hf}input_layernorm.weight",))]
        if self.m.q_lora_rank is None:
            rules.append(Rule(f"{s}linear_q_proj.weight", (f"{a}q_proj.weight",), "rope_q"))
        else:
            rules += [
                Rule(f"{s}linear_q_down_proj.weight", (f"{a}q_a_proj.weight",)),
                Rule(f"{s}q_layernorm.weight", (f"{a}q_a_layernorm.weight",)),
                Rule(f"{s}linear_q_up_proj.weight", (f"{a}q_b_proj.weight",), "rope_q"),
            ]
        rules += [
            Rule(f"{s}linear_kv_down_proj.weight", (f"{a}kv_a_proj_with_mqa.weight",), "rope_kv"),
            Rule(f"{s}kv_layernorm.weight", (f"{a}kv_a_layernorm.weight",)),
            Rule(f"{s}linear_kv_up_proj.weight", (f"{a}kv_b_proj.weight",)),
            Rule(f"{s}linear_proj.weight", (f"{a}o_proj.weight",)),
            Rule(f"{r1}pre_mlp_layernorm.weight", (f"{hf}post_attention_layernorm.weight",)),
        ]
        mlp, h = f"{r1}mlp.", f"{hf}mlp."
        if not moe:
            return rules + self._swiglu(mlp, h)
        if self.m.moe_router_enable_expert_bias:
            rules += [
                Rule(f"{mlp}router.weight", (f"{h}gate.weight",)),
                Rule(f"{mlp}router.expert_bias", (f"{h}gate.e_score_correction_bias",)),
            ]
        else:  # Hugging Face always has the bias: export zeros
            rules.append(Rule(f"{mlp}router.weight", (f"{h}gate.weight", f"{h}gate.e_score_correction_bias"), "router"))
        for e in range(self.m.num_experts):
            rules += self._swiglu(f"{mlp}experts.local_experts.{e}.", f"{h}experts.{e}.")
        if self.m.moe_shared_expert_intermediate_size:
            rules += self._swiglu(f"{mlp}shared_experts.", f"{h}shared_experts.")
        return rules

    @staticmethod
    def _swiglu(r1: str, hf: str) -> list[Rule]:
        return [
            Rule(f"{r1}linear_fc1.weight", (f"{hf}gate_proj.weight", f"{hf}up_proj.weight"), "glu"),
            Rule(f"{r1}linear_fc2.weight", (f"{hf}down_proj.weight",)),
        ]

    def _rule_groups(self) -> Iterator[list[Rule]]:
        m = self.m
        mtp = range(m.num_layers, m.num_layers + m.mtp_num_layers)
        embed_copies = tuple(f"model.layers.{i}.embed_tokens.weight" for i in mtp)
        head_copies = tuple(f"model.layers.{i}.shared_head.head.weight" for i in mtp)
        if m.tie_word_embeddings:
            embed_copies += head_copies
        yield [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", embed_copies)]
        pattern = m.moe_layer_pattern()
        for i in range(m.num_layers):
            yield self._layer_rules(f"decoder.layers.{i}.", f"model.layers.{i}.", bool(pattern[i]))
        last = [Rule("decoder.final_layernorm.weight", ("model.norm.weight",))]
        if not m.tie_word_embeddings:
            last.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab", head_copies))
        yield last
        for k, i in enumerate(mtp):
            r1, hf = f"mtp.layers.{k}.", f"model.layers.{i}."
            yield [
                Rule(f"{r1}enorm.weight", (f"{hf}enorm.weight",)),
                Rule(f"{r1}hnorm.weight", (f"{hf}hnorm.weight",)),
                Rule(f"{r1}eh_proj.weight", (f"{hf}eh_proj.weight",)),
                *self._layer_rules(f"{r1}transformer_layer.", hf, bool(pattern[-1])),
                Rule(f"{r1}final_layernorm.weight", (f"{hf}shared_head.norm.weight",)),
            ]

    # ------------------------------------------------------------------ tensor operations
    def _rope_rows(self, t: torch.Tensor, first: int, rows: int, order: torch.Tensor) -> torch.Tensor:
        """Reorder the RoPE rows ``first:`` of every ``rows``-row block of ``t``."""
        index = torch.cat([torch.arange(first), first + order]).to(t.device)
        return t.reshape(-1, rows, *t.shape[1:]).index_select(1, index).reshape(t.shape)

    def _rope_q_from_hf(self, t: torch.Tensor) -> torch.Tensor:
        # (heads * (nope + rope), in): per head [nope, rope]
        m = self.m
        return self._rope_rows(t, m.qk_head_dim, m.qk_head_dim + m.qk_pos_emb_head_dim, self._perm)

    def _rope_q_to_hf(self, t: torch.Tensor) -> torch.Tensor:
        m = self.m
        return self._rope_rows(t, m.qk_head_dim, m.qk_head_dim + m.qk_pos_emb_head_dim, self._inverse)

    def _rope_kv_from_hf(self, t: torch.Tensor) -> torch.Tensor:
        # (kv_lora_rank + rope, hidden): [latent, shared RoPE key]
        return self._rope_rows(t, self.m.kv_lora_rank, t.shape[0], self._perm)

    def _rope_kv_to_hf(self, t: torch.Tensor) -> torch.Tensor:
        return self._rope_rows(t, self.m.kv_lora_rank, t.shape[0], self._inverse)

    def _router_from_hf(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        require(
            not bias.any(),
            "the checkpoint has a non-zero e_score_correction_bias but model.moe_router_enable_expert_bias=false",
        )
        return weight

    def _router_to_hf(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return weight, torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)

    # ------------------------------------------------------------------ configs
    @classmethod
    def conventions(cls, hf: Mapping[str, Any]) -> dict[str, Any]:
        return {"rope_interleave": bool(hf.get("rope_interleave", True))}

    @classmethod
    def model_config(cls, hf: Mapping[str, Any], name: str) -> ModelConfig:
        require(hf.get("hidden_act", "silu") == "silu", "DeepseekV3 with a non-silu hidden_act cannot be represented")
        require(not hf.get("attention_bias"), "DeepseekV3 with attention_bias=true: megatron's MLA has no biases")
        eps = hf["rms_norm_eps"]
        require(
            eps == 1e-6,
            f"rms_norm_eps={eps}: Hugging Face's DeepseekV3 uses 1e-6 for the q/kv latent norms and rms_norm_eps "
            "elsewhere, megatron one epsilon for all; only 1e-6 converts exactly",
        )
        return ModelConfig(
            name=name,
            family=cls.family,
            num_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"],
            num_attention_heads=hf["num_attention_heads"],
            vocab_size=hf["vocab_size"],
            make_vocab_size_divisible_by=vocab_divisor(hf["vocab_size"]),
            max_position_embeddings=hf["max_position_embeddings"],
            norm_epsilon=eps,
            init_method_std=hf.get("initializer_range", 0.02),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            multi_latent_attention=True,
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_head_dim=hf["qk_nope_head_dim"],
            qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            mtp_num_layers=hf.get("num_nextn_predict_layers") or 0,
            **cls._moe_fields(hf),
            **cls._rope_fields(rope_parameters(hf)),
        )

    @staticmethod
    def _moe_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
        """Routing: sigmoid scores plus the correction bias, normalised top-k, optionally group-limited."""
        require(hf.get("scoring_func", "sigmoid") == "sigmoid", "DeepseekV3 routing must score experts with sigmoid")
        require(
            hf.get("topk_method", "noaux_tc") == "noaux_tc",
            f"DeepseekV3 topk_method={hf.get('topk_method')!r}: only noaux_tc (V3/R1) is supported",
        )
        layers, experts = hf["num_hidden_layers"], hf["n_routed_experts"]
        topk, first_dense = hf["num_experts_per_tok"], hf.get("first_k_dense_replace") or 0
        require(
            first_dense < layers,
            f"first_k_dense_replace={first_dense} leaves no MoE layer; r1mega's deepseek_v3 family needs at least one",
        )
        require(
            topk == 1 or hf.get("norm_topk_prob", True),
            "norm_topk_prob=false cannot be represented: megatron-core always normalises sigmoid top-k weights",
        )
        groups, group_topk = hf.get("n_group") or 1, hf.get("topk_group") or 1
        limited = 1 < groups and group_topk < groups  # otherwise every group is chosen: no limit
        if limited:
            require(experts % groups == 0, f"n_routed_experts={experts} is not divisible by n_group={groups}")
            require(
                topk == 2 * group_topk,
                f"group-limited routing with num_experts_per_tok={topk}, topk_group={group_topk}: Hugging Face "
                "scores a group by its top-2 experts, megatron-core by its top-(num_experts_per_tok / topk_group); "
                "they agree only when num_experts_per_tok = 2 x topk_group",
            )
        return dict(
            num_experts=experts,
            moe_ffn_hidden_size=hf["moe_intermediate_size"],
            moe_router_topk=topk,
            moe_shared_expert_intermediate_size=(hf.get("n_shared_experts") or 0) * hf["moe_intermediate_size"] or None,
            moe_first_k_dense=first_dense,
            moe_router_score_function="sigmoid",
            moe_router_num_groups=groups if limited else None,
            moe_router_group_topk=group_topk if limited else None,
            moe_router_topk_scaling_factor=hf.get("routed_scaling_factor", 1.0),
            moe_router_enable_expert_bias=True,
            # Training hyper-parameters Hugging Face does not hold: DeepSeek-V3's.
            moe_router_bias_update_rate=1e-3,
            moe_router_load_balancing_type="seq_aux_loss",
            moe_aux_loss_coeff=1e-4,
        )

    @staticmethod
    def _rope_fields(rope: Mapping[str, Any]) -> dict[str, Any]:
        fields: dict[str, Any] = {"rotary_base": float(rope["rope_theta"])}
        if rope["rope_type"] == "default":
            return fields
        require(
            rope["rope_type"] == "yarn",
            f"DeepseekV3 RoPE type {rope['rope_type']!r} cannot be represented: r1mega's MLA supports default RoPE and yarn",
        )
        require(
            rope.get("truncate", True),
            "yarn with truncate=false cannot be represented (megatron-core rounds the correction range)",
        )
        factor = float(rope["factor"])
        mscale, mscale_all_dim = float(rope.get("mscale") or 1.0), float(rope.get("mscale_all_dim") or 0.0)
        given = rope.get("attention_factor")
        expected = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        require(
            given is None or math.isclose(given, expected, rel_tol=1e-6),
            f"yarn attention_factor={given}: megatron-core derives {expected:.6g} from factor, mscale and mscale_all_dim",
        )
        return dict(
            fields,
            rope_scaling="yarn",
            rope_scaling_factor=factor,
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            yarn_beta_fast=float(rope.get("beta_fast") or 32.0),
            yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
            yarn_mscale=mscale,
            yarn_mscale_all_dim=mscale_all_dim,
        )

    def hf_config(self) -> dict[str, Any]:
        m = self.m
        require(
            m.multi_latent_attention and m.is_moe,
            "DeepseekV3ForCausalLM needs an MLA + MoE model (model.multi_latent_attention, model.num_experts)",
        )
        require(
            m.moe_router_score_function == "sigmoid",
            "DeepseekV3ForCausalLM routes with sigmoid scores; model.moe_router_score_function=softmax cannot be exported",
        )
        require(not m.add_qkv_bias, "DeepseekV3ForCausalLM has no attention biases")
        shared = m.moe_shared_expert_intermediate_size or 0
        require(
            shared % m.moe_ffn_hidden_size == 0,
            f"model.moe_shared_expert_intermediate_size={shared} is not a multiple of the expert size {m.moe_ffn_hidden_size}",
        )
        if m.moe_router_num_groups:
            require(
                m.moe_router_topk == 2 * m.moe_router_group_topk,
                "group-limited routing exports only with moe_router_topk = 2 x moe_router_group_topk (Hugging Face scores groups by their top-2 experts)",
            )
        require(
            m.norm_epsilon == 1e-6,
            "DeepseekV3ForCausalLM normalises the q/kv latents with eps 1e-6; set model.norm_epsilon=1e-6",
        )
        return dict(
            hidden_size=m.hidden_size,
            intermediate_size=m.ffn_hidden_size,
            moe_intermediate_size=m.moe_ffn_hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_attention_heads,
            n_shared_experts=shared // m.moe_ffn_hidden_size,
            n_routed_experts=m.num_experts,
            routed_scaling_factor=m.moe_router_topk_scaling_factor or 1.0,
            kv_lora_rank=m.kv_lora_rank,
            q_lora_rank=m.q_lora_rank,
            qk_rope_head_dim=m.qk_pos_emb_head_dim,
            v_head_dim=m.v_head_dim,
            qk_nope_head_dim=m.qk_head_dim,
            n_group=m.moe_router_num_groups or 1,
            topk_group=m.moe_router_group_topk or 1,
            num_experts_per_tok=m.moe_router_topk,
            first_k_dense_replace=m.moe_first_k_dense,
            norm_topk_prob=True,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            hidden_act="silu",
            vocab_size=m.vocab_size,
            max_position_embeddings=m.max_position_embeddings,
            initializer_range=m.init_method_std,
            rms_norm_eps=m.norm_epsilon,
            tie_word_embeddings=m.tie_word_embeddings,
            attention_bias=False,
            rope_interleave=self.rope_interleave,
            rope_parameters=self._hf_rope(),
            num_nextn_predict_layers=m.mtp_num_layers,
        )

    def _hf_rope(self) -> dict[str, Any]:
        m = self.m
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rotary_base}
        if m.rope_scaling != "yarn":
            return rope
        factor = m.rope_scaling_factor
        rope.update(
            rope_type="yarn",
            factor=factor,
            original_max_position_embeddings=m.original_max_position_embeddings,
            beta_fast=m.yarn_beta_fast,
            beta_slow=m.yarn_beta_slow,
            mscale=m.yarn_mscale,
            mscale_all_dim=m.yarn_mscale_all_dim,
        )
        if not (m.yarn_mscale and m.yarn_mscale_all_dim):  # transformers then ignores mscale: state the factor
            rope["attention_factor"] = _yarn_mscale(factor, m.yarn_mscale) / _yarn_mscale(factor, m.yarn_mscale_all_dim)
        return rope
