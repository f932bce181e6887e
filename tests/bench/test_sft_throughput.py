"""``bench/sft_throughput.py`` runs end to end at a tiny size (a smoke test, nothing is timed against a target)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bench_utils import bench_help, run_bench

TINY = [
    "--hidden", "64", "--ffn", "128", "--layers", "1", "--heads", "4", "--kv-heads", "2",
    "--vocab", "256", "--seq-length", "16", "--micro-batch", "2",
    "--warmup", "1", "--steps", "1", "--rounds", "1", "--matmul-size", "128", "--threads", "1",
]  # fmt: skip


def test_help() -> None:
    out = bench_help("sft_throughput.py")
    assert "--hidden" in out and "--dtype" in out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tiny_run_prints_the_ratio(tmp_path: Path, dtype: str) -> None:
    stdout, payload = run_bench("sft_throughput.py", *TINY, "--dtype", dtype, out_dir=tmp_path, timeout=300)
    match = re.search(r"parameters: r1mega ([\d,]+)\s+HF ([\d,]+)", stdout)
    assert match and match.group(1) == match.group(2), stdout
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    assert f"dtype={dtype}" in line
    assert float(re.search(r"ratio_r1mega/hf=([\d.]+)", line).group(1)) > 0
    assert {side["name"] for side in payload["sides"]} == {"r1mega", "hf"}
    assert payload["model_flops_per_token"] > 0 and payload["matmul_flops_per_s"] > 0
