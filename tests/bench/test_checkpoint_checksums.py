"""``bench/checkpoint_checksums.py`` runs end to end at a tiny size (a smoke test, nothing is timed against a target)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_utils import bench_help, run_bench

TINY = ["--hidden", "64", "--ffn", "128", "--layers", "1", "--heads", "4", "--vocab", "256"]


def test_help() -> None:
    out = bench_help("checkpoint_checksums.py")
    assert "--layers" in out and "--cold" in out


@pytest.mark.slow
def test_tiny_run_reports_the_checksum_share(tmp_path: Path) -> None:
    stdout, measured = run_bench("checkpoint_checksums.py", *TINY, "--dir", str(tmp_path / "run"), out_dir=tmp_path)
    assert "% of the save" in stdout
    assert measured["files"] >= 5 and 0 < measured["checksum_share_of_save"] < 1
