"""``tools/convert_checkpoint.py`` (= ``r1mega-convert``) answers ``--help`` for itself and each subcommand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ("import", "export", "verify")),
        (["import"], ("--hf", "--gguf", "--verify")),
        (["export"], ("--ckpt", "--dtype", "--max-shard-size")),
        (["verify"], ("--ckpt", "--hf")),
    ],
)
def test_help(args: list[str], expected: tuple[str, ...]) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), *args, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(word in result.stdout for word in expected), result.stdout
