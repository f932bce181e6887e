"""Import and export around training: the recorded overrides rebuild the model, ``r1mega-train`` starts from an
import (``checkpoint.load``), and its training checkpoint (``latest`` -> ``step_N/meta.json``) exports back."""

from __future__ import annotations

import json

import pytest
import torch
from ckpt_utils import run_trainer
from convert.tiny_hf import hf_model, save_hf

from r1mega.config.load import compose_config
from r1mega.config.schema import ModelConfig
from r1mega.convert.convert import (
    CONVERT_META,
    OVERRIDES_FILE,
    export_hf,
    hydra_value,
    import_hf,
    model_overrides,
    resolve_checkpoint,
)


def test_hydra_values_and_model_overrides_compose_back() -> None:
    assert [hydra_value(v) for v in (None, True, 3, 1e-06, "llama3", "a b")] == [
        "null",
        "true",
        "3",
        "1e-06",
        "llama3",
        "'a b'",
    ]
    model = ModelConfig(
        name="x",
        family="llama",
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=256,
        num_attention_heads=4,
        vocab_size=512,
        num_query_groups=2,
        rope_scaling="llama3",
        norm_epsilon=9.999999747378752e-06,
    )
    assert compose_config(model_overrides(model)).model == model


def test_import_records_model_overrides_and_tokenizer(tmp_path) -> None:
    src = save_hf(hf_model("qwen2"), tmp_path / "hf")
    (src / "tokenizer.json").write_text("{}")
    result = import_hf(str(src), tmp_path / "ckpt", ["precision=bf16", "parallel=tp2"])
    overrides = (tmp_path / "ckpt" / OVERRIDES_FILE).read_text().split()
    assert overrides == result.overrides and "parallel=tp2" in overrides and "precision=bf16" in overrides
    assert compose_config(overrides).model == result.model
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").is_file()
    meta = json.loads((tmp_path / "ckpt" / CONVERT_META).read_text())
    assert meta["hf_config"]["model_type"] == "qwen2" and meta["precision"] == "bf16"
    path, info = resolve_checkpoint(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" and ModelConfig(**info["model"]) == result.model


@pytest.mark.slow
def test_train_from_an_import_then_export_the_training_checkpoint(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    src = save_hf(hf_model("qwen2"), tmp_path / "hf")
    result = import_hf(str(src), tmp_path / "ckpt")
    run = tmp_path / "run"
    args = [*result.overrides, f"checkpoint.load={tmp_path / 'ckpt'}", "optim.train_steps=1", "optim.lr_warmup_steps=0"]
    proc = run_trainer([*args, "data.seq_length=32", "logging.progress_bar=false"], run)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "initialised weights from" in proc.stdout
    exported = export_hf(run / "checkpoints", tmp_path / "out", verify=True)  # latest -> step_1/meta.json
    assert exported.report.max_abs_diff <= 1e-5
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    before = hf_model("qwen2")
    moved = (trained.model.norm.weight - before.model.norm.weight).abs().max()
    assert 0 < moved < 0.1  # one optimizer step from the imported weights
