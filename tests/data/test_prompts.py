"""Prompt sets: both record forms, malformed lines named by file and line, and the seeded sampler."""

from __future__ import annotations

import json

import pytest

from r1mega.data.prompts import Prompt, PromptDataError, PromptSampler, load_prompts


def test_both_record_forms(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    rows = [
        {"id": "a", "task": "gcd", "prompt": "gcd(4, 6)?", "answer": "2"},
        {"id": "b", "prompt": "1+1?", "reasoning": "r", "response": "x", "meta": {"task": "chain_sum", "answer": 2}},
        {"prompt": "no id", "answer": "3"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert load_prompts(str(path)) == [
        Prompt("a", "gcd(4, 6)?", "2", "gcd"),
        Prompt("b", "1+1?", "2", "chain_sum"),
        Prompt("p.jsonl:4", "no id", "3", None),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1]", "expected a JSON object"),
        ('{"prompt": "", "answer": "1"}', "'prompt' must be a non-empty string"),
        ('{"prompt": "q"}', "no 'answer'"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok", "answer": "1"}\n' + line + "\n")
    with pytest.raises(PromptDataError, match=rf"p\.jsonl:2: {message}"):
        load_prompts(str(path))


def test_missing_and_empty_files(tmp_path) -> None:
    with pytest.raises(PromptDataError, match="No prompt data file"):
        load_prompts(str(tmp_path / "none.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PromptDataError, match="holds no usable prompt record"):
        load_prompts(str(tmp_path / "empty.jsonl"))


def test_sampler_splits_ranks_and_resumes() -> None:
    ranks = [PromptSampler(10, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    taken = [s.take(3) for s in ranks]
    assert not set(taken[0]) & set(taken[1]) and len(set(taken[0] + taken[1])) == 6
    again = PromptSampler(10, seed=3, dp_rank=0, dp_size=2)
    again.position = ranks[0].position - 6
    assert again.take(3) == taken[0]
