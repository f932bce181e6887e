"""``r1mega-eval``'s report: per-task metrics, the Markdown table, and a missing eval set named as a config key."""

from __future__ import annotations

import pytest

from r1mega.config.errors import ConfigError
from r1mega.config.load import compose_config
from r1mega.eval.protocol import SampleResult
from r1mega.eval.run import build_report, markdown_report, run_evaluation


def _results() -> list[SampleResult]:
    out = []
    for prompt, task, correct in (("a", "gcd", [True, True]), ("b", "gcd", [False, True]), ("c", None, [False, False])):
        out += [SampleResult(prompt, task, "t", "1" if ok else "2", ok, ok, 10) for ok in correct]
    return out


def test_report_has_overall_and_per_task_metrics() -> None:
    report = build_report(_results(), k=2)
    assert report["k"] == 2
    m = report["metrics"]
    assert m["pass@1"] == pytest.approx((1 + 0.5 + 0) / 3) and m["cons@k"] == pytest.approx(1 / 3)
    assert m["accuracy/gcd"] == pytest.approx(0.75) and m["accuracy/unknown"] == 0.0
    assert report["tasks"]["gcd"] == {"pass@1": 0.75, "cons@k": 0.5, "format_rate": 0.75,
                                      "response_length": 10.0, "prompts": 2.0}  # fmt: skip
    assert set(report["tasks"]) == {"gcd", "unknown"}


def test_markdown_table() -> None:
    report = build_report(_results(), k=2)
    report.update(model="qwen2_tiny", checkpoint="/c", eval_path="/e.jsonl")
    report["settings"] = {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 64}
    md = markdown_report(report)
    assert "| task | prompts | pass@1 | cons@2 | format rate | mean length |" in md
    assert "| **all** | 3 | 0.500 | 0.333 | 0.500 | 10.0 |" in md
    assert "| gcd | 2 | 0.750 | 0.500 | 0.750 | 10.0 |" in md
    assert "T=0.6, top-p=0.95" in md


def test_no_eval_set_is_a_config_error() -> None:
    cfg = compose_config(["checkpoint.load=/nowhere"])
    with pytest.raises(ConfigError, match=r"^data\.eval_path=None is invalid"):
        run_evaluation(cfg, ctx=None)
