"""Write a tiny offline preference set for reward-model training from the cold-start set.

Example::

    r1mega-make-preferences --cold-start data/cold_start --out data/preferences

writes ``train.jsonl`` and ``eval.jsonl`` (``{"id", "prompt", "chosen", "rejected", "meta"}``; the held-out
pairs come from the cold-start eval split) and ``manifest.json``. ``chosen`` is the clean, concise,
well-formatted answer; ``rejected`` is a corruption of it: an unclosed or doubled think block, rambling
repetition, mixed languages or a wrong final answer. Offline and deterministic for a seed. The logic lives
in ``r1mega.data.preferences``; ``r1mega-train --config-name reward_model_tiny`` trains on the result.
"""

from __future__ import annotations

import argparse
import json

from r1mega.utils.logging import setup_logging

KINDS = ("unclosed_think", "double_think", "rambling", "mixed_language", "wrong_answer")
"""r1mega.data.preferences.REJECTION_KINDS, repeated so that --help does not import torch."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="r1mega-make-preferences", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cold-start", default="data/cold_start", help="cold-start folder (default data/cold_start)")
    parser.add_argument("--out", required=True, help="output folder for the JSONL files and manifest")
    parser.add_argument("--num-train", type=int, default=1000, help="cold-start training records used (default 1000)")
    parser.add_argument("--num-eval", type=int, default=100, help="cold-start eval records used (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help=f"comma-separated rejection kinds (default {','.join(KINDS)})"
    )
    parser.add_argument(
        "--pairs-per-record", type=int, default=1, help="pairs per record, each of another kind (default 1)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Generate the set and print its manifest."""
    args = parse_args(argv)
    setup_logging()
    from r1mega.data.preferences import write_preferences

    manifest = write_preferences(
        args.cold_start,
        args.out,
        num_train=args.num_train,
        num_eval=args.num_eval,
        seed=args.seed,
        kinds=args.kinds.split(","),
        pairs_per_record=args.pairs_per_record,
    )
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
