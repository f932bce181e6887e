"""Load an exported Hugging Face folder with ``transformers`` alone and generate from held-out prompts.

The pipeline runs this after every export step: the proof that a student folder is usable outside r1mega
(``AutoModelForCausalLM`` + ``AutoTokenizer`` + the folder's chat template and generation config), not only
that the converter's logits matched. Writes ``generations.json``: per prompt the text, the token count and
whether the boxed answer is right (the same accuracy reward as training, in-process: the text is our own
model's, and the prompts are few).

    python -m r1mega.pipeline.hf_check HF_DIR --prompts eval_prompts.jsonl --out generations.json
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


def generate(hf_dir: str | Path, prompts: list[dict[str, Any]], max_new_tokens: int = 96) -> list[dict[str, Any]]:
    """Greedy generations of the HF model in ``hf_dir`` for each ``{"prompt", "answer", "task"}`` row."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1mega.rewards.accuracy import accuracy
    from r1mega.rewards.registry import RewardInput

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rows = []
    for row in prompts:
        chat = [{"role": "user", "content": row["prompt"]}]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + THINK_PREFIX
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
            prefix_in_prompt=True,
        )
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
    return rows


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", help="an exported Hugging Face folder")
    parser.add_argument("--prompts", required=True, help="JSONL of held-out prompts (id, task, prompt, answer)")
    parser.add_argument("--num", type=int, default=4, help="how many prompts (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--out", required=True, help="where to write generations.json")
    args = parser.parse_args(argv)
    with open(args.prompts, encoding="utf-8") as f:
        prompts = [json.loads(line) for line in itertools.islice(f, args.num)]
    rows = generate(args.hf_dir, prompts, args.max_new_tokens)
    if not all(r["new_tokens"] > 0 for r in rows):
        log.error("%s generated nothing for some prompts", args.hf_dir)
        return 1
    Path(args.out).write_text(json.dumps({"hf_dir": str(args.hf_dir), "generations": rows}, indent=2))
    for r in rows:
        log.info("%s -> %r (%s)", r["id"], r["completion"][-80:], "right" if r["correct"] else "wrong")
    return 0


if __name__ == "__main__":
    sys.exit(main())
