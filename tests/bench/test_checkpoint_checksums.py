"""``bench/checkpoint_checksums.py`` runs end to end at a tiny size (a smoke test, nothing is timed against a target)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "checkpoint_checksums.py"
TINY = ["--hidden", "64", "--ffn", "128", "--layers", "1", "--heads", "4", "--vocab", "256"]


def test_help() -> None:
    result = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--layers" in result.stdout and "--cold" in result.stdout


@pytest.mark.slow
def test_tiny_run_reports_the_checksum_share(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), *TINY, "--dir", str(tmp_path / "run"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "% of the save" in result.stdout
    measured = json.loads(out.read_text())
    assert measured["files"] >= 5 and 0 < measured["checksum_share_of_save"] < 1
