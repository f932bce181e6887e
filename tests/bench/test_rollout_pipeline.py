"""``bench/rollout_pipeline.py`` runs end to end at a tiny size (a smoke test, nothing is timed against a target)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_utils import run_bench

TINY = ["--hidden", "64", "--layers", "2", "--ffn", "128", "--vocab", "256", "--batch", "3", "--new-tokens", "3",
        "--rounds", "1", "--row-groups", "1,2"]  # fmt: skip


@pytest.mark.slow
def test_tiny_run_prints_the_table(tmp_path: Path) -> None:
    """One process and PP2 with one and two row groups decode the same greedy tokens (the script checks it before
    timing) and every side reports a throughput."""
    stdout, payload = run_bench("rollout_pipeline.py", *TINY, out_dir=tmp_path)
    assert "| PP2, 2 row groups |" in stdout and "greedy tokens equal on every side" in stdout
    assert payload["one_process_tok_s"] > 0 and payload["floor_tok_s"] > 0
    assert set(payload["pp2_tok_s"]) == {"1", "2"} and all(v > 0 for v in payload["pp2_tok_s"].values())
