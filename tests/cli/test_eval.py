"""``r1mega-eval`` end to end on a tiny random checkpoint: JSON, Markdown and per-sample output with R1's
metric keys; ``--help`` works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from generation_utils import job_args, make_checkpoint, make_prompt_data, run_job


def test_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "r1mega.cli.eval", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "eval: base, default" in out.stdout and "rejection: base, default, distill" in out.stdout


def test_eval_writes_json_markdown_and_samples(tmp_path: Path) -> None:
    data, ckpt = make_prompt_data(tmp_path / "data"), make_checkpoint(tmp_path / "ckpt")
    args = [*job_args(data, ckpt), "eval.max_prompts=5", "eval.samples=3", "eval.max_new_tokens=8", "eval.batch_size=2",
            f"eval.output_dir={tmp_path / 'out'}"]  # fmt: skip
    (log,) = run_job("r1mega.cli.eval", args, tmp_path / "run")
    assert log.startswith("[rc=0]"), log[-3000:]
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    m = report["metrics"]
    assert {"pass@1", "cons@k", "format_rate", "response_length", "prompts"} <= m.keys()
    assert m["prompts"] == 5 and 1 <= m["response_length"] <= 8
    assert any(k.startswith("accuracy/") for k in m) and report["tasks"]
    assert report["k"] == 3 and report["checkpoint"] == str(ckpt) and report["model"] == "qwen2_tiny"
    assert report["settings"]["temperature"] == 0.6 and report["settings"]["top_p"] == 0.95
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "| **all** | 5 |" in md and "cons@3" in md
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 15 and {"prompt_id", "text", "answer", "correct", "formatted", "length"} <= samples[0].keys()
