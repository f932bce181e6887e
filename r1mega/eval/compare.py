"""Whether one checkpoint is better than another on the same held-out prompts: a paired bootstrap of pass@1.

Each evaluation (``r1mega-eval``, ``eval.after_training``) writes ``samples.jsonl``, one scored sample per line.
Per prompt, pass@1 is the share of its k samples that are right; the difference after - before is paired over
the prompts both evaluations saw, and its 95% interval comes from resampling those prompts with replacement
(the prompt, not the sample, is the unit: samples of one prompt are not independent). An interval that excludes
zero is a measured gain (or loss); one that straddles it is noise at this many prompts.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any


class CompareError(ValueError):
    """Two evaluations cannot be compared; the message says why."""


def per_prompt_pass1(samples_path: str | Path) -> dict[str, float]:
    """prompt id -> share of its samples marked ``correct`` in an evaluation's ``samples.jsonl``."""
    right: dict[str, list[bool]] = defaultdict(list)
    with open(samples_path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                right[str(row["prompt_id"])].append(bool(row["correct"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CompareError(f"{samples_path}:{number}: not a scored sample ({e})") from e
    return {p: sum(v) / len(v) for p, v in right.items()}


def paired_bootstrap(
    before: dict[str, float], after: dict[str, float], resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Mean of after - before over the prompts both have, and its bootstrap percentile interval at ``level``."""
    common = sorted(before.keys() & after.keys())
    if len(common) < 2:
        raise CompareError(f"the evaluations share {len(common)} prompt(s): compare them on the same prompt set")
    diffs = [after[p] - before[p] for p in common]
    n, rng = len(diffs), random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1.0 - level) / 2
    low, high = means[int(tail * resamples)], means[min(int((1.0 - tail) * resamples), resamples - 1)]
    return {
        "prompts": n,
        "before": sum(before[p] for p in common) / n,
        "after": sum(after[p] for p in common) / n,
        "diff": sum(diffs) / n,
        "low": low,
        "high": high,
        "level": level,
        "resamples": resamples,
        "significant": low > 0.0 or high < 0.0,
        "improved": sum(d > 0 for d in diffs),
        "worsened": sum(d < 0 for d in diffs),
    }


def compare_evaluations(before_dir: str | Path, after_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """:func:`paired_bootstrap` of two evaluation folders (each with ``samples.jsonl``)."""
    paths = [Path(d) / "samples.jsonl" for d in (before_dir, after_dir)]
    for path in paths:
        if not path.is_file():
            raise CompareError(f"{path} does not exist: run the evaluation first")
    return paired_bootstrap(*(per_prompt_pass1(p) for p in paths), **kwargs)
