"""``bench/rollout_throughput.py`` runs end to end at a tiny size (a smoke test, nothing is timed against a target)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "rollout_throughput.py"
TINY = [
    "--hidden", "64", "--layers", "1", "--ffn", "128", "--vocab", "256", "--batch", "2", "--new-tokens", "4",
    "--mean-length", "2", "--prompts-per-row", "2", "--rounds", "1", "--threads", "1", "--mtp-checkpoint", "none",
]  # fmt: skip


def test_help() -> None:
    result = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--batch" in result.stdout and "--mtp-checkpoint" in result.stdout


@pytest.mark.slow
def test_tiny_run_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), *TINY, "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "| dense | 2 | fixed |" in result.stdout and "| MoE+MLA | 2 | varied |" in result.stdout
    cells = json.loads(out.read_text())["dense"]["cells"]
    assert all(c["floor_tok_s"] > 0 and c["r1mega_cb_tok_s"] > 0 and c["hf_tok_s"] > 0 for c in cells)
