"""Run a ``bench/`` script as its user would: ``--help``, or a tiny run that writes its result as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def bench_help(script: str) -> str:
    """``bench/<script> --help``'s output (the script must exit 0)."""
    result = subprocess.run(
        [sys.executable, str(BENCH_DIR / script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_bench(script: str, *args: str, out_dir: Path, timeout: float = 600) -> tuple[str, dict[str, Any]]:
    """Run ``bench/<script> *args --json <out_dir>/result.json``; return its stdout and the JSON it wrote."""
    out = out_dir / "result.json"
    result = subprocess.run(
        [sys.executable, str(BENCH_DIR / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout, json.loads(out.read_text())
