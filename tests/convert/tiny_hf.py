"""Tiny random Hugging Face models (built from configs, nothing downloaded) and helpers for the converter tests.

Tests import them as ``convert.tiny_hf`` (``tests/`` is on the path); worker scripts, started in fresh
processes from this folder, as ``tiny_hf``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 256,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def hf_config(family: str, variant: str = "default") -> object:
    """A tiny ``transformers`` config of ``family``.

    deepseek_v3 ``default``: q-LoRA, yarn, interleaved RoPE, 1 dense-first layer of 3, 16 routed experts in
    4 groups (2 chosen per token, top-4 experts), 1 shared expert, 1 MTP layer. ``plain``: no q-LoRA, plain
    RoPE in rotate-half order, no MTP.
    """
    from transformers import DeepseekV3Config, LlamaConfig, Qwen2Config

    dense = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if family == "llama":
        return LlamaConfig(
            **dense, num_key_value_heads=2, max_position_embeddings=16384, rms_norm_eps=1e-5, rope_parameters=LLAMA3
        )
    if family == "qwen2":
        rope = {"rope_type": "default", "rope_theta": 1e6}
        return Qwen2Config(**dense, num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=rope)
    plain = variant == "plain"
    return DeepseekV3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=16,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
        first_k_dense_replace=1,
        q_lora_rank=None if plain else 32,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0} if plain else YARN,
        rope_interleave=not plain,
        max_position_embeddings=1024,
        num_nextn_predict_layers=0 if plain else 1,
    )


def hf_model(family: str, variant: str = "default", seed: int = 0) -> torch.nn.Module:
    """A tiny random ``*ForCausalLM`` whose every parameter matters: biases, router weights large enough to
    route decisively and a non-zero expert-score correction bias."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, variant), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.1)
    return model


def save_hf(model: torch.nn.Module, directory: Path) -> Path:
    """``save_pretrained``, plus DeepSeek's MTP layer (as in its release: layer ``num_hidden_layers``) when
    the config declares one, since transformers neither builds nor saves it."""
    model.save_pretrained(directory)
    config = model.config
    if getattr(config, "num_nextn_predict_layers", 0):
        main = load_tensors(directory)
        last, mtp = config.num_hidden_layers - 1, config.num_hidden_layers
        generator = torch.Generator().manual_seed(1)
        extra = {
            k.replace(f"model.layers.{last}.", f"model.layers.{mtp}."): v
            + 0.01 * torch.randn(v.shape, generator=generator)
            for k, v in main.items()
            if k.startswith(f"model.layers.{last}.")
        }
        hidden = config.hidden_size
        extra.update(
            {
                f"model.layers.{mtp}.enorm.weight": torch.rand(hidden, generator=generator),
                f"model.layers.{mtp}.hnorm.weight": torch.rand(hidden, generator=generator),
                f"model.layers.{mtp}.eh_proj.weight": 0.02 * torch.randn(hidden, 2 * hidden, generator=generator),
                f"model.layers.{mtp}.shared_head.norm.weight": torch.rand(hidden, generator=generator),
                f"model.layers.{mtp}.embed_tokens.weight": main["model.embed_tokens.weight"].clone(),
                f"model.layers.{mtp}.shared_head.head.weight": main["lm_head.weight"].clone(),
            }
        )
        save_file(extra, directory / "mtp.safetensors", metadata={"format": "pt"})
        index = {
            "metadata": {},
            "weight_map": {**dict.fromkeys(main, "model.safetensors"), **dict.fromkeys(extra, "mtp.safetensors")},
        }
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the safetensors files of ``directory``."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def round_trip(family: str, root: Path, variant: str = "default", overrides: tuple[str, ...] = ()) -> dict:
    """Hugging Face -> r1mega -> Hugging Face with ``--verify`` both ways; returns the folders and reports."""
    from r1mega.convert.convert import export_hf, import_hf

    src = save_hf(hf_model(family, variant), root / "hf")
    imported = import_hf(str(src), root / "ckpt", overrides, verify=True)
    exported = export_hf(root / "ckpt", root / "out", verify=True)
    return {"src": src, "ckpt": root / "ckpt", "out": root / "out", "import": imported, "export": exported}


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's FP8 release format: e4m3 values and one ``scale_inv`` (dequantization multiplier) per block."""
    import math

    rows, cols = weight.shape
    nr, nc = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    padded = weight.new_zeros(nr * block[0], nc * block[1])
    padded[:rows, :cols] = weight
    tiles = padded.view(nr, block[0], nc, block[1])
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # (nr, nc)
    quantized = (tiles / scale[:, None, :, None]).view_as(padded)[:rows, :cols].to(torch.float8_e4m3fn)
    return quantized.contiguous(), scale.float()
