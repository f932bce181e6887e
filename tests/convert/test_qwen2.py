"""Qwen2: q/k/v biases fused like the weights, tied embeddings, and what cannot be represented.

Measured (fp32, 2 layers, GQA 4/2 heads, tied embeddings, random biases): r1mega's logits equal transformers'
exactly (max |diff| 0); the export is bit-identical to the source (no lm_head written: tied).
"""

from __future__ import annotations

import pytest
from convert.tiny_hf import assert_bit_identical, hf_config, hf_model, load_tensors, round_trip

from r1mega.convert.adapter import ConvertError
from r1mega.convert.qwen2 import Qwen2Adapter

FP32_LOGITS = 1e-5


def test_config_round_trip() -> None:
    model = Qwen2Adapter.model_config(hf_config("qwen2").to_dict(), "tiny")
    assert model.add_qkv_bias and model.tie_word_embeddings and model.rotary_base == 1e6
    assert Qwen2Adapter.model_config(Qwen2Adapter(model).hf_config(), "tiny") == model


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_sliding_window": True, "sliding_window": 16}, "sliding"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
    ],
)
def test_unrepresentable_configs_fail_with_a_sentence(change: dict, message: str) -> None:
    with pytest.raises(ConvertError, match=message):
        Qwen2Adapter.model_config({**hf_config("qwen2").to_dict(), **change}, "tiny")


def test_state_dict_round_trip_is_exact() -> None:
    hf = hf_model("qwen2").state_dict()
    hf.pop("lm_head.weight")  # tied: transformers does not save it
    adapter = Qwen2Adapter(Qwen2Adapter.model_config(hf_config("qwen2").to_dict(), "tiny"))
    r1 = adapter.from_hf_state_dict(hf)
    assert "output_layer.weight" not in r1
    assert r1["decoder.layers.1.self_attention.linear_qkv.bias"].shape == (128,)
    assert_bit_identical(adapter.to_hf_state_dict(r1), hf)


def test_hf_to_r1mega_to_hf(tmp_path) -> None:
    result = round_trip("qwen2", tmp_path)
    assert result["import"].report.max_abs_diff <= FP32_LOGITS and result["import"].report.greedy_agreement == 1.0
    assert result["export"].report.max_abs_diff <= FP32_LOGITS
    assert result["import"].unused == ()
    exported = load_tensors(result["out"])
    assert "lm_head.weight" not in exported
    assert_bit_identical(exported, load_tensors(result["src"]))
