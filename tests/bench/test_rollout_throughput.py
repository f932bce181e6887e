"""``bench/rollout_throughput.py`` runs end to end at a tiny size (a smoke test, nothing is timed against a target)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_utils import bench_help, run_bench

TINY = [
    "--hidden", "64", "--layers", "1", "--ffn", "128", "--vocab", "256", "--batch", "2", "--new-tokens", "4",
    "--mean-length", "2", "--prompts-per-row", "2", "--rounds", "1", "--threads", "1", "--mtp-checkpoint", "none",
]  # fmt: skip


def test_help() -> None:
    out = bench_help("rollout_throughput.py")
    assert "--batch" in out and "--mtp-checkpoint" in out


@pytest.mark.slow
def test_tiny_run_prints_the_table(tmp_path: Path) -> None:
    stdout, payload = run_bench("rollout_throughput.py", *TINY, "--no-compiled", out_dir=tmp_path)
    assert "| dense | 2 | fixed |" in stdout and "| MoE+MLA | 2 | varied |" in stdout
    cells = payload["dense"]["cells"]
    assert all(c["floor_tok_s"] > 0 and c["r1mega_cb_tok_s"] > 0 and c["hf_tok_s"] > 0 for c in cells)
    # The work floor adds the prefill to the step floor's time for the same tokens, so it is below it in tokens/s.
    # (The step floor against the matmul floor is two timings: not compared here, where timing is noise.)
    for c in cells:
        assert 0 < c["work_floor_tok_s"] < c["step_floor_tok_s"] and c["floor_tok_s"] > 0, c
        assert c["prefill_floor_s"] > 0 and c["attention_floor_s"] > 0 and c["attention_floor_gb_s"] > 0
        assert c["ceiling_of_floor"] == pytest.approx(c["work_floor_tok_s"] / c["floor_tok_s"])
        # a side's share of the work floor is its share of the floor scaled by floor / work floor (CB's work here)
        share = c["r1mega_cb_of_floor"] * c["floor_tok_s"] / c["work_floor_tok_s"]
        assert c["r1mega_cb_of_work_floor"] == pytest.approx(share)
        # prompts of 16-48 tokens, up to 4 new: each generated token attends its prompt and the tokens before it
        assert all(16 < n <= 48 + 4 for n in c["mean_attended"].values()), c["mean_attended"]


@pytest.mark.slow
def test_tiny_run_with_compiled_steps(tmp_path: Path) -> None:
    """The compiled sides (CPU): both loops with compiled decode steps, timed after a warm-up that compiles."""
    stdout, payload = run_bench("rollout_throughput.py", *TINY, "--skip-moe", "--lengths", "fixed", out_dir=tmp_path)
    (cell,) = payload["dense"]["cells"]
    assert cell["r1mega_compiled_tok_s"] > 0 and cell["r1mega_cb_compiled_tok_s"] > 0
    assert cell["compile_warmup_s"]["r1mega_cb_compiled"] > 0
    row = next(line for line in stdout.splitlines() if line.startswith("| dense | 2 | fixed |"))
    assert "-" not in [x.strip() for x in row.split("|")[4:8]], row  # r1mega, r1mega compiled, CB, CB compiled
