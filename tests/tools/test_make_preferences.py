"""tools/make_preferences.py: --help, and a preference set (with manifest) from a cold-start folder."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from r1mega.data.coldstart import make_prompt, make_response
from r1mega.data.preferences import REJECTION_KINDS, read_preferences

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_preferences.py"


def test_tool_help() -> None:
    result = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--cold-start" in result.stdout and "--out" in result.stdout and "--kinds" in result.stdout
    spec = importlib.util.spec_from_file_location("make_preferences", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.KINDS == REJECTION_KINDS  # the tool's copy (its --help imports no torch)


def test_writes_a_preference_set(tmp_path: Path) -> None:
    src = tmp_path / "cold_start"
    src.mkdir()
    for name, start in (("train", 0), ("eval", 50)):
        records = [
            {
                "id": f"{name}-{i}",
                "prompt": make_prompt(f"Calculate {i} + 1."),
                "reasoning": f"{i} + 1 = {i + 1}",
                "response": make_response(str(i + 1)),
                "meta": {"task": "basic_arithmetic", "answer": str(i + 1)},
            }
            for i in range(start, start + 6)
        ]
        (src / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "prefs"
    args = ["--cold-start", str(src), "--out", str(out), "--num-train", "4", "--kinds", "rambling,wrong_answer"]
    result = subprocess.run(
        [sys.executable, str(TOOL), *args, "--pairs-per-record", "2"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["train"] == {"pairs": 8, "kinds": {"rambling": 4, "wrong_answer": 4}}
    assert manifest["eval"]["pairs"] == 12
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert len(read_preferences(out / "train.jsonl")) == 8
