"""tools/plot_metrics.py: --help, and a PNG (plus CSV) from scalars written by TensorBoard's SummaryWriter."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "plot_metrics.py"


def load_tool() -> Any:
    spec = importlib.util.spec_from_file_location("plot_metrics", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_help() -> None:
    result = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--scalars" in result.stdout and "--out" in result.stdout


def test_plots_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "run" / "tb")) as writer:
        for step in range(1, 6):
            writer.add_scalar("grpo/reward_mean", 0.1 * step, step)
            writer.add_scalar("grpo/loss", 1.0 / step, step)
        writer.add_scalar("grpo/eval/pass@1", 0.25, 5)
    out, table = tmp_path / "plot.png", tmp_path / "values.csv"
    load_tool().main([str(tmp_path / "run"), "--out", str(out), "--csv", str(table), "--scalars", "reward_mean",
                      "eval/pass@1", "loss", "missing"])  # fmt: skip
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(table.open()))
    assert [r["step"] for r in rows if r["tag"] == "grpo/reward_mean"] == ["1", "2", "3", "4", "5"]
    assert [(r["step"], float(r["value"])) for r in rows if r["tag"] == "grpo/eval/pass@1"] == [("5", 0.25)]
    assert "skipping missing" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="None of"):
        load_tool().main([str(tmp_path / "run"), "--scalars", "missing"])
