"""``r1mega-rejection-sample``: ``--help`` and a bad override rejected in one line before anything starts.
(The job itself is tested in tests/stages/test_rejection_sampling.py.)"""

from __future__ import annotations

import subprocess
import sys


def test_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "r1mega.cli.rejection_sample", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rejection: base, default, distill" in out.stdout


def test_bad_override_is_one_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "r1mega.cli.rejection_sample", "rejection.top_p=1.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "r1mega: config error: rejection.top_p=1.5 is invalid: expected a number in (0, 1]"
