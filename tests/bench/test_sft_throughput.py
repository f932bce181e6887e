"""``bench/sft_throughput.py`` runs end to end at a tiny size (a smoke test, nothing is timed against a target)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sft_throughput.py"
TINY = [
    "--hidden", "64", "--ffn", "128", "--layers", "1", "--heads", "4", "--kv-heads", "2",
    "--vocab", "256", "--seq-length", "16", "--micro-batch", "2",
    "--warmup", "1", "--steps", "1", "--rounds", "1", "--matmul-size", "128", "--threads", "1",
]  # fmt: skip


def test_help() -> None:
    result = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--hidden" in result.stdout and "--dtype" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tiny_run_prints_the_ratio(tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), *TINY, "--dtype", dtype, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    match = re.search(r"parameters: r1mega ([\d,]+)\s+HF ([\d,]+)", result.stdout)
    assert match and match.group(1) == match.group(2), result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    assert f"dtype={dtype}" in line
    assert float(re.search(r"ratio_r1mega/hf=([\d.]+)", line).group(1)) > 0
    payload = json.loads(out.read_text())
    assert {side["name"] for side in payload["sides"]} == {"r1mega", "hf"}
    assert payload["model_flops_per_token"] > 0 and payload["matmul_flops_per_s"] > 0
