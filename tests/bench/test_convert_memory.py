"""``bench/convert_memory.py`` runs end to end at a tiny size (a smoke test; the figures are not checked)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_utils import bench_help, run_bench

TINY = ["--hidden", "64", "--ffn", "128", "--layers", "2", "--heads", "4", "--vocab", "256"]


def test_help() -> None:
    out = bench_help("convert_memory.py")
    assert "--layers" in out and "VmHWM" in out


@pytest.mark.slow
def test_tiny_run_reports_both_phases(tmp_path: Path) -> None:
    stdout, payload = run_bench("convert_memory.py", *TINY, "--dir", str(tmp_path), out_dir=tmp_path)
    assert stdout.count("RESULT ") == 2
    assert payload["checkpoint_bytes"] > 0 and payload["largest_layer_bytes"] > 0
    assert all(
        payload[phase]["peak_rss_bytes"] > 0 < payload[phase]["fixed_rss_bytes"] for phase in ("import", "export")
    )
