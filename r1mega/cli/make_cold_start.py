"""Write R1's cold-start SFT set (and optionally its tiny tokenizer) from reasoning-gym's math generators.

Example::

    r1mega-make-cold-start --out data/coldstart --tokenizer-out data/coldstart/tokenizer

writes ``train.jsonl`` and ``eval.jsonl`` (SFT records with reasoning), ``eval_prompts.jsonl``
(``{"id", "task", "prompt", "answer"}`` for GRPO/evaluation) and ``manifest.json``. Offline and deterministic
for a seed. The logic lives in ``r1mega.data.coldstart``.
"""

from __future__ import annotations

import argparse
import json

from r1mega.utils.logging import setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="r1mega-make-cold-start", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder for the JSONL files and manifest")
    parser.add_argument("--num-train", type=int, default=3000, help="training examples (default 3000)")
    parser.add_argument("--num-eval", type=int, default=200, help="held-out eval examples (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    parser.add_argument(
        "--preset",
        default="default",
        help="task mix and difficulty: default (all registered tasks) or easy (the tiny CPU pipeline's set)",
    )
    parser.add_argument(
        "--unboxed-share",
        type=float,
        default=0.0,
        help="share of training records that state the answer without \\boxed{} (a format habit for RL to unlearn)",
    )
    parser.add_argument(
        "--tasks", default=None, help="comma-separated reasoning-gym tasks (default: all of the preset)"
    )
    parser.add_argument("--tokenizer-out", default=None, help="also train the tiny R1 tokenizer and save it here")
    parser.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary size (default 2048)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Generate the set and print its manifest."""
    args = parse_args(argv)
    setup_logging()
    from r1mega.data.coldstart import write_cold_start

    manifest = write_cold_start(
        args.out,
        num_train=args.num_train,
        num_eval=args.num_eval,
        seed=args.seed,
        tasks=args.tasks.split(",") if args.tasks else None,
        tokenizer_out=args.tokenizer_out,
        vocab_size=args.vocab_size,
        preset=args.preset,
        unboxed_share=args.unboxed_share,
    )
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
