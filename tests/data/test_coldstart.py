"""The cold-start set: worked solutions, boxed answers, train/eval disjointness, determinism, the CLI."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from r1mega.data.coldstart import (
    TASKS,
    ColdStartError,
    generate_cold_start,
    write_cold_start,
)
from r1mega.data.sft import read_sft_jsonl, tokenize_example
from r1mega.data.tokenizer import THINK_END, THINK_START, load_tokenizer

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_cold_start.py"
BOXED = re.compile(r"\\boxed\{(.*)\}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coldstart")
    write_cold_start(str(out), num_train=400, num_eval=100, seed=3, tokenizer_out=str(out / "tok"), vocab_size=1024)
    return out


def test_files_sizes_and_task_mix(out: Path) -> None:
    train, held_out = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    assert len(train) == 400 and len(held_out) == 100
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_train"] == 400 and set(manifest["tasks"]) == set(TASKS)
    assert sum(t["eval"] for t in manifest["tasks"].values()) == 100
    assert {r["meta"]["task"] for r in train} == set(TASKS)


def test_train_and_eval_prompts_are_disjoint(out: Path) -> None:
    train, held_out = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    train_prompts = {r["prompt"] for r in train}
    assert len(train_prompts) == len(train)  # no duplicates inside train either
    assert not train_prompts & {r["prompt"] for r in held_out}
    ids = [r["id"] for r in train + held_out]
    assert len(set(ids)) == len(ids)


def test_every_record_reasons_and_boxes_the_verified_answer(out: Path) -> None:
    import reasoning_gym

    for record in read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl"):
        assert record["reasoning"].strip() and "\\boxed{}" in record["prompt"]
        boxed = BOXED.search(record["response"])
        assert boxed and boxed.group(1) == record["meta"]["answer"]
        score = reasoning_gym.get_score_answer_fn(record["meta"]["task"])
        assert score(boxed.group(1), {"answer": record["meta"]["answer"], "metadata": {}}) == 1.0


def test_eval_prompts_file(out: Path) -> None:
    prompts, held_out = read_jsonl(out / "eval_prompts.jsonl"), read_jsonl(out / "eval.jsonl")
    assert all(set(p) == {"id", "task", "prompt", "answer"} for p in prompts)
    assert [(p["id"], p["prompt"], p["answer"]) for p in prompts] == [
        (r["id"], r["prompt"], r["meta"]["answer"]) for r in held_out
    ]


def test_sft_reader_and_tokenizer_take_the_set(out: Path) -> None:
    examples, skipped = read_sft_jsonl(out / "train.jsonl")
    assert skipped == 0 and len(examples) == 400
    tok = load_tokenizer(str(out / "tok"))
    assert len(tok) <= 1024
    ids, mask = tokenize_example(examples[0], tok)
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained.startswith(f"{THINK_START}\n{examples[0].messages[1]['reasoning']}\n{THINK_END}\n\n")


def test_deterministic_and_ids_stable_across_sizes() -> None:
    a = generate_cold_start(num_train=40, num_eval=10, seed=1, tasks=["chain_sum", "gcd"])
    assert a == generate_cold_start(num_train=40, num_eval=10, seed=1, tasks=["chain_sum", "gcd"])
    bigger = generate_cold_start(num_train=80, num_eval=10, seed=1, tasks=["chain_sum", "gcd"])
    by_id = {r["id"]: r for r in bigger[0] + bigger[1]}
    shared = [r for r in a[0] + a[1] if r["id"] in by_id]
    assert shared and all(by_id[r["id"]] == r for r in shared)
    with pytest.raises(ColdStartError, match="Unknown cold-start task"):
        generate_cold_start(num_train=4, num_eval=1, tasks=["chess"])


def test_unboxed_share_states_answers_in_plain_words() -> None:
    plain, held_plain = generate_cold_start(num_train=40, num_eval=10, seed=1, preset="easy", unboxed_share=0.25)
    boxed, held_boxed = generate_cold_start(num_train=40, num_eval=10, seed=1, preset="easy")
    unboxed = [r for r in plain if r["meta"].get("unboxed")]
    assert len(unboxed) == 10 and held_plain == held_boxed  # held-out records keep the box
    for r, ref in zip(plain, boxed, strict=True):
        assert r["id"] == ref["id"] and r["reasoning"] == ref["reasoning"]
        if r["meta"].get("unboxed"):
            assert r["response"] == f"The answer is {r['meta']['answer']}." and not BOXED.search(r["response"])
        else:
            assert r == ref
    with pytest.raises(ColdStartError, match="unboxed_share=1.5"):
        generate_cold_start(num_train=4, num_eval=1, unboxed_share=1.5)


def test_worked_solutions_by_hand() -> None:
    reasoning, answer = TASKS["chain_sum"].solve({"metadata": {"expression": "6 - 8 + 7"}})
    assert answer == "5" and "6 - 8 = -2\n-2 + 7 = 5" in reasoning
    reasoning, answer = TASKS["basic_arithmetic"].solve({"metadata": {"expression": "-( -41 - 43 ) / 12"}})
    assert answer == "7" and "-41 - 43 = -84, leaving 84 / 12\n84 / 12 = 7" in reasoning
    assert (
        TASKS["basic_arithmetic"].solve({"metadata": {"expression": "7 / 2 - 3"}})[1] == "0"
    )  # floor, as reasoning-gym
    reasoning, answer = TASKS["products"].solve({"metadata": {"expression": "874 * 530"}})
    assert answer == "463220" and "874 * 500 = 437000\n874 * 30 = 26220" in reasoning
    reasoning, answer = TASKS["gcd"].solve({"metadata": {"numbers": [26, 760]}})
    assert answer == "2" and "760 = 29 * 26 + 6" in reasoning
    assert TASKS["lcm"].solve({"metadata": {"numbers": [63, 91]}})[1] == "819"
    assert TASKS["prime_factorization"].solve({"metadata": {"number": 656}})[1] == "2 × 2 × 2 × 2 × 41"


def load_tool() -> Any:
    spec = importlib.util.spec_from_file_location("make_cold_start", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_help() -> None:
    result = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--tokenizer-out" in result.stdout and "--num-train" in result.stdout


def test_tool_writes_a_set(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = load_tool()
    monkeypatch.setattr("r1mega.cli.make_cold_start.setup_logging", lambda: None)  # leave the session's logging alone
    tool.main(["--out", str(tmp_path), "--num-train", "20", "--num-eval", "5", "--tasks", "chain_sum,lcm"])
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["num_train"] == 20 and set(manifest["tasks"]) == {"chain_sum", "lcm"}
    assert len(read_jsonl(tmp_path / "eval_prompts.jsonl")) == 5
