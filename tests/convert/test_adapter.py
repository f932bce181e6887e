"""The adapter contract's shared pieces: fused QKV and SwiGLU layouts, vocabulary padding, the registry entries."""

from __future__ import annotations

import pytest
import torch

from r1mega.config.schema import ModelConfig
from r1mega.convert.adapter import ConvertError, adapter_class, rope_parameters, vocab_divisor
from r1mega.convert.llama import LlamaAdapter
from r1mega.models.registry import FAMILIES, family_for_hf_model_type


def _adapter(**fields) -> LlamaAdapter:
    base = dict(name="t", family="llama", num_layers=1, hidden_size=8, ffn_hidden_size=16, num_attention_heads=4)
    return LlamaAdapter(ModelConfig(**{**base, **fields}))


def test_fused_qkv_groups_each_key_value_head_with_its_queries() -> None:
    adapter = _adapter(num_query_groups=2, vocab_size=10)  # 2 query heads per group, head_dim 2
    q, k, v = torch.arange(8.0)[:, None], 100 + torch.arange(4.0)[:, None], 200 + torch.arange(4.0)[:, None]
    fused = adapter._qkv_from_hf(q, k, v)  # (groups * (2 + 2) * head_dim, 1)
    assert fused[:, 0].tolist() == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    assert all(torch.equal(a, b) for a, b in zip(adapter._qkv_to_hf(fused), (q, k, v), strict=True))


def test_swiglu_fc1_is_gate_then_up_and_vocab_rows_pad_and_unpad() -> None:
    adapter = _adapter(vocab_size=10, make_vocab_size_divisible_by=8)
    gate, up = torch.zeros(16, 8), torch.ones(16, 8)
    assert torch.equal(adapter._glu_from_hf(gate, up)[16:], up)
    embedding = torch.randn(10, 8)
    padded = adapter._vocab_from_hf(embedding)
    assert padded.shape == (16, 8) and not padded[10:].any()
    assert torch.equal(adapter._vocab_to_hf(padded), embedding)
    with pytest.raises(ConvertError, match="vocabulary rows"):
        adapter._vocab_from_hf(torch.zeros(17, 8))


def test_helpers() -> None:
    assert [vocab_divisor(v) for v in (49152, 151936, 129280, 32001, 50)] == [128, 128, 128, 1, 2]
    assert rope_parameters({"rope_theta": 5.0, "rope_scaling": {"type": "yarn", "factor": 40}}) == {
        "rope_type": "yarn",
        "factor": 40,
        "rope_theta": 5.0,
    }
    assert rope_parameters({}) == {"rope_type": "default", "rope_theta": 10000.0}


def test_every_family_names_its_adapter() -> None:
    for family in FAMILIES.values():
        adapter = adapter_class(family)
        assert (adapter.family, adapter.hf_architecture, adapter.hf_model_type) == (
            family.name,
            family.hf_architecture,
            family.hf_model_type,
        )
        assert family_for_hf_model_type(family.hf_model_type) is family
    with pytest.raises(KeyError, match="supported: deepseek_v3, llama, qwen2"):
        family_for_hf_model_type("mistral")
    with pytest.raises(ConvertError, match="has no Hugging Face counterpart"):
        _adapter(vocab_size=10).rule("decoder.layers.9.mlp.linear_fc1.weight")
