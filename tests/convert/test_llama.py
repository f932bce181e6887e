"""Llama: config mapping, what cannot be represented, and HF -> r1mega -> HF on a tiny random model.

Measured (fp32, 2 layers, GQA 4/2 heads, llama3 RoPE scaling): r1mega's logits equal transformers' exactly
(max |diff| 0) and the exported safetensors are bit-identical to the source.
"""

from __future__ import annotations

import pytest
import torch
from convert.tiny_hf import assert_bit_identical, hf_config, hf_model, load_tensors, round_trip

from r1mega.convert.adapter import ConvertError
from r1mega.convert.llama import LlamaAdapter

FP32_LOGITS = 1e-5


def test_config_round_trip() -> None:
    model = LlamaAdapter.model_config(hf_config("llama").to_dict(), "tiny")
    assert (model.num_query_groups, model.rope_scaling, model.rope_scaling_factor) == (2, "llama3", 8.0)
    assert model.padded_vocab_size == model.vocab_size == 256  # no padding rows added
    assert LlamaAdapter.model_config(LlamaAdapter(model).hf_config(), "tiny") == model


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attention_bias": True}, "attention_bias"),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 2.0}},
            "low_freq_factor",
        ),
        ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 5e5, "factor": 2.0}}, "dynamic"),
        ({"hidden_act": "gelu"}, "silu"),
    ],
)
def test_unrepresentable_configs_fail_with_a_sentence(change: dict, message: str) -> None:
    with pytest.raises(ConvertError, match=message):
        LlamaAdapter.model_config({**hf_config("llama").to_dict(), **change}, "tiny")


def test_state_dict_round_trip_is_exact() -> None:
    hf = hf_model("llama").state_dict()
    adapter = LlamaAdapter(LlamaAdapter.model_config(hf_config("llama").to_dict(), "tiny"))
    r1 = adapter.from_hf_state_dict(hf)
    assert r1["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (128, 64)  # 2 groups x (2 + 2) x 16
    assert_bit_identical(adapter.to_hf_state_dict(r1), hf)


def test_hf_to_r1mega_to_hf(tmp_path, tokens: torch.Tensor) -> None:
    result = round_trip("llama", tmp_path)
    assert result["import"].report.max_abs_diff <= FP32_LOGITS and result["import"].report.greedy_agreement == 1.0
    assert result["export"].report.max_abs_diff <= FP32_LOGITS
    assert result["import"].unused == ()
    assert_bit_identical(load_tensors(result["out"]), load_tensors(result["src"]))
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(result["out"], dtype=torch.float32).eval()
    original = hf_model("llama")
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, original(tokens).logits)
