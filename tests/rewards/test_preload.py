"""The fork-server preload module: it warms math-verify and imports nothing heavy (no torch, no config)."""

from __future__ import annotations

import importlib
import subprocess
import sys

from r1mega.rewards import equivalence
from r1mega.rewards.pool import PRELOAD_MODULE


def test_preload_warms_math_verify() -> None:
    importlib.import_module(PRELOAD_MODULE)
    assert "math_verify" in sys.modules
    assert equivalence._warm


def test_workers_import_no_torch() -> None:
    # Every verifier worker (and the fork server) imports this; torch would cost seconds and gigabytes each.
    code = f"import sys, {PRELOAD_MODULE}; heavy = {{'torch', 'megatron', 'transformers', 'r1mega.config'}}; "
    code += "print(sorted(heavy & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
