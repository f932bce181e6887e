"""``bench/convert_memory.py`` runs end to end at a tiny size (a smoke test; the figures are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "convert_memory.py"
TINY = ["--hidden", "64", "--ffn", "128", "--layers", "2", "--heads", "4", "--vocab", "256"]


def test_help() -> None:
    result = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--layers" in result.stdout and "VmHWM" in result.stdout


@pytest.mark.slow
def test_tiny_run_reports_both_phases(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), *TINY, "--dir", str(tmp_path), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("RESULT ") == 2
    payload = json.loads(out.read_text())
    assert payload["checkpoint_bytes"] > 0 and payload["largest_layer_bytes"] > 0
    assert all(
        payload[phase]["peak_rss_bytes"] > 0 < payload[phase]["fixed_rss_bytes"] for phase in ("import", "export")
    )
