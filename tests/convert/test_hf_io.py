"""The Hugging Face side on disk: the unbuffered sharded writer, the one-tensor reader, FP8 dequantization."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from convert.tiny_hf import hf_config, hf_model, load_tensors, quantize_fp8, save_hf
from safetensors import safe_open

from r1mega.convert.adapter import ConvertError
from r1mega.convert.hf_io import SafetensorsSource, SafetensorsWriter, dequantize_fp8, parse_size


def test_writer_plans_shards_and_takes_tensors_in_any_order(tmp_path) -> None:
    tensors = {
        "a": torch.randn(64, 32),
        "b": torch.randn(16).to(torch.bfloat16),
        "c": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "d": torch.randn(8, 8).to(torch.float8_e4m3fn),
        "e": torch.randn(128, 32),
    }
    plan = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = SafetensorsWriter(tmp_path, plan, max_shard_bytes=9000)
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]  # a..d, then e
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, tensor in tensors.items():
        with safe_open(tmp_path / index["weight_map"][name], "pt") as f:
            assert torch.equal(f.get_tensor(name).view(torch.uint8), tensor.view(torch.uint8))


def test_writer_refuses_unplanned_or_missing_tensors(tmp_path) -> None:
    writer = SafetensorsWriter(tmp_path, [("a", (2,), torch.float32), ("b", (2,), torch.float32)], 1 << 20)
    with pytest.raises(ConvertError, match="planned"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ConvertError, match="not written"):
        writer.close()


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("1234") == 1234


def test_dequantize_fp8_multiplies_each_block_by_its_scale() -> None:
    weight = torch.randn(300, 200)
    quantized, scale = quantize_fp8(weight, (128, 128))
    assert scale.shape == (3, 2)  # partial blocks at the edges
    out = dequantize_fp8(quantized, scale)
    assert out.dtype == torch.bfloat16
    block = quantized[128:256, 128:200].float() * scale[1, 1]
    assert torch.equal(out[128:256, 128:200], block.to(torch.bfloat16))
    assert ((out.float() - weight).abs() <= 0.07 * weight.abs() + 1e-2).all()


def test_fp8_release_format_imports_as_bf16(tmp_path) -> None:
    """A DeepSeek FP8 checkpoint (16 x 16 blocks here, so the tiny weights span several) imports as bf16 equal to
    the dequantized weights, and the imported model reproduces transformers on the dequantized weights."""
    from transformers import AutoModelForCausalLM

    from r1mega.convert.convert import import_hf, make_adapter

    src = save_hf(hf_model("deepseek_v3"), tmp_path / "hf")
    block = (16, 16)
    fp8_dir, plain_dir = tmp_path / "fp8", tmp_path / "dequantized"
    fp8, plain = {}, {}
    for name, tensor in load_tensors(src).items():
        if name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight"):
            fp8[name], fp8[f"{name}_scale_inv"] = quantize_fp8(tensor, block)
            plain[name] = dequantize_fp8(fp8[name], fp8[f"{name}_scale_inv"], block)
        else:  # the release keeps the other weights in bf16, the correction bias in fp32
            fp8[name] = plain[name] = tensor if name.endswith("correction_bias") else tensor.to(torch.bfloat16)
    config = json.loads((src / "config.json").read_text())
    from safetensors.torch import save_file

    for folder, tensors, extra in (
        (
            fp8_dir,
            fp8,
            {
                "quantization_config": {
                    "quant_method": "fp8",
                    "fmt": "e4m3",
                    "activation_scheme": "dynamic",
                    "weight_block_size": list(block),
                }
            },
        ),
        (plain_dir, plain, {}),
    ):
        folder.mkdir()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({**config, **extra}))
    assert SafetensorsSource(fp8_dir)["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    result = import_hf(str(fp8_dir), tmp_path / "ckpt", verify=True, hf_model=reference)
    assert result.report.max_abs_diff <= 1e-5 and result.unused == ()
    assert "precision.dtype=bf16" in result.overrides

    from r1mega.convert.megatron_io import CheckpointReader

    adapter, reader = make_adapter(result.model, config), CheckpointReader(tmp_path / "ckpt")
    plain_source = SafetensorsSource(plain_dir)
    for name in adapter.names():
        expected = adapter.from_hf(name, plain_source)
        stored = reader.read(name)
        assert torch.equal(stored, expected.to(stored.dtype)), name
    assert reader.spec("decoder.layers.1.self_attention.linear_q_up_proj.weight")[1] == torch.bfloat16
    shutil.rmtree(tmp_path / "ckpt")
    assert hf_config("deepseek_v3").num_nextn_predict_layers == 1
