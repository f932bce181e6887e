"""The paired bootstrap of two evaluations (r1mega/eval/compare.py): prompts are the unit, a real gain is found, a
coin flip is not, and files that cannot be compared say why."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from r1mega.eval.compare import CompareError, compare_evaluations, paired_bootstrap, per_prompt_pass1


def _write(folder: Path, rights: dict[str, list[bool]]) -> Path:
    folder.mkdir(parents=True)
    rows = [{"prompt_id": p, "correct": c} for p, cs in rights.items() for c in cs]
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_per_prompt_pass1_averages_each_prompts_samples(tmp_path: Path) -> None:
    folder = _write(tmp_path / "e", {"a": [True, False, False, True], "b": [False] * 4})
    assert per_prompt_pass1(folder / "samples.jsonl") == {"a": 0.5, "b": 0.0}


def test_a_real_gain_excludes_zero_and_noise_does_not() -> None:
    rng = random.Random(0)
    before = {str(i): rng.choice([0.0, 0.25]) for i in range(200)}
    gain = paired_bootstrap(before, {p: v + 0.25 * (int(p) % 2) for p, v in before.items()}, resamples=2000)
    assert gain["significant"] and gain["low"] > 0 and gain["diff"] == pytest.approx(0.125)
    assert (gain["improved"], gain["worsened"], gain["prompts"]) == (100, 0, 200)
    noise = paired_bootstrap(before, {p: rng.choice([0.0, 0.25]) for p in before}, resamples=2000)
    assert not noise["significant"] and noise["low"] < 0 < noise["high"]


def test_only_shared_prompts_count_and_files_must_exist(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", {"x": [True], "y": [False], "z": [True]})
    b = _write(tmp_path / "b", {"x": [True], "y": [True]})
    result = compare_evaluations(a, b, resamples=100)
    assert result["prompts"] == 2 and result["before"] == 0.5 and result["after"] == 1.0
    with pytest.raises(CompareError, match="does not exist: run the evaluation first"):
        compare_evaluations(a, tmp_path / "missing")
    with pytest.raises(CompareError, match="share 0 prompt"):
        paired_bootstrap({"x": 1.0}, {"y": 1.0})


def test_a_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text('{"prompt_id": "a", "correct": true}\n{"prompt_id": "b"}\n')
    with pytest.raises(CompareError, match=r"samples.jsonl:2: not a scored sample"):
        per_prompt_pass1(path)
