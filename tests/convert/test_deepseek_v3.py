"""DeepseekV3: MLA (q-LoRA or not, yarn, interleaved or rotate-half RoPE), group-limited sigmoid routing with
the expert-score correction bias, shared experts, dense-first layers and the MTP layer, both ways.

Measured (fp32, 3 layers of which 1 dense, 16 experts in 4 groups, top-4 within 2 groups, 1 shared expert,
1 MTP layer): r1mega's logits match transformers' to 1.8e-7 (plain variant 2.4e-7); every tensor of the export,
the MTP layer included, is bit-identical to the source.
"""

from __future__ import annotations

import pytest
import torch
from convert.tiny_hf import assert_bit_identical, hf_config, hf_model, load_tensors, round_trip

from r1mega.convert.adapter import ConvertError
from r1mega.convert.deepseek_v3 import DeepseekV3Adapter
from r1mega.convert.megatron_io import CheckpointReader

FP32_LOGITS = 1e-5


def test_config_round_trip() -> None:
    model = DeepseekV3Adapter.model_config(hf_config("deepseek_v3").to_dict(), "tiny")
    assert (model.moe_router_num_groups, model.moe_router_group_topk, model.moe_router_topk) == (4, 2, 4)
    assert (model.moe_first_k_dense, model.moe_shared_expert_intermediate_size, model.mtp_num_layers) == (1, 32, 1)
    assert (model.q_lora_rank, model.rope_scaling, model.yarn_mscale_all_dim) == (32, "yarn", 1.0)
    assert model.moe_router_score_function == "sigmoid" and model.moe_router_enable_expert_bias
    assert DeepseekV3Adapter.model_config(DeepseekV3Adapter(model).hf_config(), "tiny") == model


RELEASED = {  # DeepSeek-R1's config.json (FP8 release), as published
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 2.5,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
    "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280,
}  # fmt: skip


def test_released_config_is_the_deepseek_v3_preset(tmp_path) -> None:
    import json
    from dataclasses import replace

    from r1mega.config.load import compose_config
    from r1mega.convert.hf_io import read_hf_config

    (tmp_path / "config.json").write_text(json.dumps(RELEASED))
    model = DeepseekV3Adapter.model_config(read_hf_config(tmp_path), "deepseek_v3")
    preset = compose_config(["model=deepseek_v3"]).model
    assert replace(model, init_method_std=preset.init_method_std) == preset  # Hugging Face holds 0.02, not V3's 0.006


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"norm_topk_prob": False}, "norm_topk_prob"),
        ({"num_experts_per_tok": 3}, "2 x topk_group"),
        ({"scoring_func": "softmax"}, "sigmoid"),
        ({"rms_norm_eps": 1e-5}, "1e-6"),
        ({"rope_parameters": {**hf_config("deepseek_v3").rope_parameters, "truncate": False}}, "truncate"),
    ],
)
def test_unrepresentable_configs_fail_with_a_sentence(change: dict, message: str) -> None:
    with pytest.raises(ConvertError, match=message):
        DeepseekV3Adapter.model_config({**hf_config("deepseek_v3").to_dict(), **change}, "tiny")


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_rows_round_trip_on_meta_tensors(interleave: bool) -> None:
    model = DeepseekV3Adapter.model_config(hf_config("deepseek_v3").to_dict(), "tiny")
    adapter = DeepseekV3Adapter(model, rope_interleave=interleave)
    q = torch.arange(4 * 24 * 32, dtype=torch.float32).reshape(96, 32)
    r1 = adapter._rope_q_from_hf(q)
    assert torch.equal(r1, q) == interleave  # megatron reads DeepSeek's interleaved layout as is
    assert torch.equal(adapter._rope_q_to_hf(r1), q)
    assert adapter._rope_kv_from_hf(torch.empty(40, 64, device="meta")).shape == (40, 64)


def test_group_limited_routing_matters_in_the_test_model(tokens: torch.Tensor) -> None:
    model = hf_model("deepseek_v3")
    with torch.no_grad():
        limited = model(tokens).logits
        for layer in model.model.layers[1:]:
            layer.mlp.gate.num_group, layer.mlp.gate.topk_group = 1, 1
        unlimited = model(tokens).logits
    assert (limited - unlimited).abs().max() > 1e-3


def test_hf_round_trip_through_grouped_experts(tmp_path) -> None:
    """Imported into a model with grouped experts (``model.moe_experts=grouped``, the GPU default on Hopper: the
    meta model's experts are megatron-core's stacked ``weight1``/``weight2``), the checkpoint verifies against
    Hugging Face's logits and exports back bit-identically."""
    result = round_trip("deepseek_v3", tmp_path, overrides=("model.moe_experts=grouped",))
    assert result["import"].model.moe_experts == "grouped"
    assert result["import"].report.max_abs_diff <= FP32_LOGITS and result["import"].report.greedy_agreement == 1.0
    assert result["export"].report.max_abs_diff <= FP32_LOGITS
    assert_bit_identical(load_tensors(result["out"]), load_tensors(result["src"]))


@pytest.mark.parametrize("variant", ["default", "plain"])
def test_hf_to_r1mega_to_hf(tmp_path, variant: str) -> None:
    result = round_trip("deepseek_v3", tmp_path, variant)
    assert result["import"].report.max_abs_diff <= FP32_LOGITS and result["import"].report.greedy_agreement == 1.0
    assert result["export"].report.max_abs_diff <= FP32_LOGITS
    assert result["import"].unused == ()
    source = load_tensors(result["src"])
    assert_bit_identical(load_tensors(result["out"]), source)
    reader = CheckpointReader(result["ckpt"])
    if variant == "default":  # the MTP layer (layer 3) is kept in r1mega's mtp.layers.0
        assert result["import"].model.mtp_num_layers == 1
        assert torch.equal(reader.read("mtp.layers.0.eh_proj.weight"), source["model.layers.3.eh_proj.weight"])
    bias = reader.read("decoder.layers.2.mlp.router.expert_bias")
    assert torch.equal(bias, source["model.layers.2.mlp.gate.e_score_correction_bias"]) and bias.abs().sum() > 0
