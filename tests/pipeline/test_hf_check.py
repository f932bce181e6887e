"""The pipeline's export check: an exported student folder loads in ``transformers`` alone and generates."""

from __future__ import annotations

import json

import pytest
from generation_utils import make_checkpoint, make_prompt_data

from r1mega.cli.convert import main as convert
from r1mega.pipeline.hf_check import main as hf_check


@pytest.mark.parametrize("model", ["qwen2_tiny", "llama_tiny"])
def test_exported_student_loads_and_generates(tmp_path, model) -> None:
    data = make_prompt_data(tmp_path / "data")
    ckpt = make_checkpoint(tmp_path / "ckpt", model)
    hf = tmp_path / "hf"
    convert(["export", "--ckpt", str(ckpt), "--out", str(hf), "--tokenizer", str(data / "tokenizer"), f"model={model}"])
    out = tmp_path / "generations.json"
    prompts = data / "eval_prompts.jsonl"
    assert hf_check([str(hf), "--prompts", str(prompts), "--num", "2", "--max-new-tokens", "8", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["generations"]
    expected = [json.loads(line) for line in prompts.read_text().splitlines()[:2]]
    assert [r["id"] for r in rows] == [e["id"] for e in expected]
    assert all(0 < r["new_tokens"] <= 8 and isinstance(r["completion"], str) for r in rows)
    assert all(r["correct"] is False for r in rows)  # random weights do not box the right answer
