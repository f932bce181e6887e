"""Load an exported Hugging Face folder with ``transformers`` alone and generate from held-out prompts.

The pipeline runs this after every export step: the proof that a student folder is usable outside r1mega
(``AutoModelForCausalLM`` + ``AutoTokenizer`` + the folder's chat template and generation config), not only
that the converter's logits matched. Writes ``generations.json``: per prompt the text, the token count and
whether the boxed answer is right (the same accuracy reward as training, in-process: the text is our own
model's, and the prompts are few). With ``--ckpt`` the r1mega checkpoint that was exported generates greedily from
the same prompts too (fp32, one process), and each row records whether its tokens equal transformers'.
Prompts are rendered as training rendered them: ``--override`` takes the training config's overrides that set
``grpo.prefix`` and ``grpo.system_prompt`` (``grpo=r1_chat``).

    python -m r1mega.pipeline.hf_check HF_DIR --prompts eval_prompts.jsonl --out generations.json \
        [--ckpt CKPT] [--override grpo=r1_chat]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from r1mega.utils.logging import get_logger, setup_logging

log = get_logger(__name__)

THINK_PREFIX = "<think>\n"
"""R1's recommendation, as the rollouts and evaluations force it."""


def r1mega_greedy(ckpt: str | Path, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (``lengths[i]`` tokens each) by the r1mega checkpoint ``ckpt`` in fp32."""
    from r1mega.config.load import compose_config
    from r1mega.config.schema import ModelConfig
    from r1mega.convert.convert import model_overrides, resolve_checkpoint
    from r1mega.convert.verify import fp32_single_process, greedy_generate, load_r1mega
    from r1mega.parallel.bootstrap import single_process

    path, info = resolve_checkpoint(ckpt)
    cfg = compose_config(model_overrides(ModelConfig(**info["model"])))
    with single_process(fp32_single_process(cfg)):
        chunks = load_r1mega(cfg, str(path))
        return [greedy_generate(chunks, p, n, cfg.model.vocab_size) for p, n in zip(prompts, lengths, strict=True)]


def generate(
    hf_dir: str | Path,
    prompts: list[dict[str, Any]],
    max_new_tokens: int = 96,
    prefix: str = THINK_PREFIX,
    system: str | None = None,
    ckpt: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Greedy generations of the HF model in ``hf_dir`` for each ``{"prompt", "answer", "task"}`` row (and of the
    r1mega checkpoint ``ckpt`` when given)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1mega.data.prompts import chat_messages
    from r1mega.rewards.accuracy import accuracy
    from r1mega.rewards.registry import RewardInput

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rows, inputs, outputs = [], [], []
    for row in prompts:
        chat = chat_messages(row["prompt"], system)
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + prefix
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(
                ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
            )
        completion = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        sample = RewardInput(
            prompt=row["prompt"],
            completion=completion,
            answer=row["answer"],
            task=row.get("task"),
            prefix_in_prompt=bool(prefix),
        )
        inputs.append(ids[0].tolist())
        outputs.append(out[0, ids.shape[1] :].tolist())
        rows.append(
            {
                "id": row.get("id"),
                "prompt": row["prompt"],
                "completion": completion,
                "new_tokens": int(out.shape[1] - ids.shape[1]),
                "answer": row["answer"],
                "correct": accuracy(sample) == 1.0,
            }
        )
    if ckpt is not None:
        theirs = r1mega_greedy(ckpt, inputs, [len(o) for o in outputs])
        for row, mine, ours in zip(rows, outputs, theirs, strict=True):
            row["matches_r1mega"] = mine == ours
            if mine != ours:
                row["r1mega_completion"] = tokenizer.decode(ours, skip_special_tokens=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", help="an exported Hugging Face folder")
    parser.add_argument("--prompts", required=True, help="JSONL of held-out prompts (id, task, prompt, answer)")
    parser.add_argument("--num", type=int, default=4, help="how many prompts (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--out", required=True, help="where to write generations.json")
    parser.add_argument("--ckpt", default=None, help="the exported r1mega checkpoint: also generate with it, compare")
    parser.add_argument(
        "--override", action="append", default=[], help="training-config override for the prompt format (repeatable)"
    )
    args = parser.parse_args(argv)
    from r1mega.config.load import compose_config

    g = compose_config(args.override).grpo
    with open(args.prompts, encoding="utf-8") as f:
        prompts = [json.loads(line) for line in itertools.islice(f, args.num)]
    rows = generate(args.hf_dir, prompts, args.max_new_tokens, g.prefix, g.system_prompt, args.ckpt)
    if not all(r["new_tokens"] > 0 for r in rows):
        log.error("%s generated nothing for some prompts", args.hf_dir)
        return 1
    Path(args.out).write_text(json.dumps({"hf_dir": str(args.hf_dir), "generations": rows}, indent=2))
    for r in rows:
        log.info("%s -> %r (%s)", r["id"], r["completion"][-80:], "right" if r["correct"] else "wrong")
    if not all(r.get("matches_r1mega", True) for r in rows):
        log.error("%s: transformers' greedy tokens differ from r1mega's for some prompts", args.hf_dir)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
