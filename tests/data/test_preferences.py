"""Preference pairs: the generator's corruptions are what they claim and deterministic, the JSONL reader
names file:line for malformed lines, and tokenization and batches put the score's token where the model reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1mega.data.coldstart import make_prompt, make_response
from r1mega.data.preferences import (
    REJECTION_KINDS,
    PreferenceDataError,
    clean_response,
    make_pair_batch,
    make_pairs,
    read_preferences,
    response_ids,
    tokenize_pairs,
    write_preferences,
)
from r1mega.data.tokenizer import load_tokenizer, train_tokenizer
from r1mega.rewards.answer import extract_answer
from r1mega.rewards.formatting import think_format_ok
from r1mega.rewards.language import word_scripts


def cold_start_records(n: int, tag: str = "t", start: int = 0) -> list[dict]:
    """Records shaped like r1mega.data.coldstart's, without reasoning-gym."""
    out = []
    for i in range(start, start + n):
        a, b = 10 + i, 7 + 2 * i
        answer = str(a + b) if i % 3 else f"{a} × {b}"
        out.append(
            {
                "id": f"{tag}-{i:03d}",
                "prompt": make_prompt(f"Calculate {a} + {b}."),
                "reasoning": f"Add the numbers.\n{a} + {b} = {a + b}\nSo the value is {a + b}.",
                "response": make_response(answer),
                "meta": {"task": "basic_arithmetic", "answer": answer},
            }
        )
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    texts = [f"{r['prompt']}\n{r['reasoning']}\n{r['response']}" for r in cold_start_records(40)]
    train_tokenizer(texts, vocab_size=400, out_dir=str(out))
    return out


def test_each_kind_corrupts_the_clean_answer_as_documented() -> None:
    records = cold_start_records(20)
    pairs = make_pairs(records, seed=0, pairs_per_record=len(REJECTION_KINDS))
    assert len(pairs) == 20 * len(REJECTION_KINDS)
    by_id = {r["id"]: r for r in records}
    for pair in pairs:
        record = by_id[pair.meta["source_id"]]
        kind, rejected = pair.meta["kind"], pair.rejected
        assert pair.chosen == clean_response(record["reasoning"], record["response"]) != rejected
        assert think_format_ok(pair.chosen) and pair.prompt == record["prompt"]
        assert pair.id == f"{record['id']}-{kind}"
        if kind == "unclosed_think":
            assert "</think>" not in rejected and not think_format_ok(rejected)
        elif kind == "double_think":
            assert rejected.count("<think>") == 2 and not think_format_ok(rejected)
        elif kind == "rambling":
            assert think_format_ok(rejected) and len(rejected) > 1.8 * len(pair.chosen)
        elif kind == "mixed_language":
            scripts = word_scripts(rejected)
            assert think_format_ok(rejected) and (scripts["han"] or scripts["cyrillic"])
            assert extract_answer(rejected) == record["meta"]["answer"]
        else:
            assert think_format_ok(rejected) and extract_answer(rejected) not in (None, record["meta"]["answer"])


def test_generator_is_deterministic_and_balances_kinds() -> None:
    records = cold_start_records(25)
    first, again, other = make_pairs(records, seed=1), make_pairs(records, seed=1), make_pairs(records, seed=2)
    assert first == again
    assert first != other
    kinds = [p.meta["kind"] for p in first]
    assert {kinds.count(k) for k in REJECTION_KINDS} == {5}
    # a pair depends on its record, seed and kind only, not on the records around it
    alone = make_pairs(records[3:4], seed=1, kinds=[first[3].meta["kind"]])
    assert alone[0].rejected == first[3].rejected


def test_write_preferences_splits_train_and_eval(tmp_path: Path) -> None:
    src = tmp_path / "cold_start"
    src.mkdir()
    for name, records in (("train", cold_start_records(30, "a")), ("eval", cold_start_records(10, "b", start=100))):
        (src / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = write_preferences(str(src), str(tmp_path / "out"), num_train=20, num_eval=0, seed=4)
    assert manifest["train"]["pairs"] == 20 and manifest["eval"]["pairs"] == 10
    train, held_out = (read_preferences(tmp_path / "out" / f"{n}.jsonl") for n in ("train", "eval"))
    assert len(train) == 20 and len(held_out) == 10
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    again = write_preferences(str(src), str(tmp_path / "again"), num_train=20, num_eval=0, seed=4)
    assert again["train"] == manifest["train"]
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == (tmp_path / "again" / "train.jsonl").read_bytes()


def test_unboxed_cold_start_records_are_not_chosen(tmp_path: Path) -> None:
    src = tmp_path / "cold_start"
    src.mkdir()
    records = cold_start_records(12, "a")
    for r in records[::2]:  # as --unboxed-share writes them
        r["response"], r["meta"] = f"The answer is {r['meta']['answer']}.", {**r["meta"], "unboxed": True}
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (src / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cold_start_records(4, "b", start=100)))
    write_preferences(str(src), str(tmp_path / "out"), num_train=0, num_eval=0, seed=0)
    train = read_preferences(tmp_path / "out" / "train.jsonl")
    assert {p.prompt for p in train} == {r["prompt"] for r in records[1::2]}
    assert all("\\boxed{" in p.chosen for p in train)


GOOD = {"id": "p1", "prompt": "2+2?", "chosen": "<think>\n2+2=4\n</think>\n\n4", "rejected": "5"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({**GOOD, "rejected": None}), "'rejected' must be a string"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "chosen"}), "'chosen' must be a string"),
        (json.dumps({**GOOD, "rejected": GOOD["chosen"]}), "the same text"),
        (json.dumps({**GOOD, "prompt": "  "}), "'prompt' is blank"),
        (json.dumps({**GOOD, "score": 1}), "unknown field"),
        (json.dumps([1, 2]), "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(PreferenceDataError, match=rf"^{path}:3: .*{message}"):
        read_preferences(path)
    kept = read_preferences(path, skip_malformed=True)
    assert [p.id for p in kept] == ["p1", "p1"]


def test_tokens_end_with_the_end_of_turn_and_batches_point_at_it(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(str(tokenizer_dir))
    pairs = make_pairs(cold_start_records(4), seed=0)
    ids = response_ids(tok, pairs[0].prompt, pairs[0].chosen)
    assert ids[-1] == tok.eos_token_id and ids[0] == tok.bos_token_id
    assert tok.decode(ids).endswith(pairs[0].chosen + tok.eos_token)
    tokenized = tokenize_pairs(pairs, tok, max_length=10**6)
    lengths = [len(x) for pair in tokenized[:2] for x in pair]
    batch = make_pair_batch(tokenized[:2], pad_id=tok.pad_token_id, multiple_of=4)
    assert batch["tokens"].shape == (4, -(-max(lengths) // 4) * 4)
    assert batch["last"].tolist() == [n - 1 for n in lengths]
    assert (batch["tokens"][range(4), batch["last"]] == tok.eos_token_id).all()
    assert batch["tokens"][1].tolist()[: lengths[1]] == tokenized[0][1]
    # a side longer than max_length drops its whole pair
    short = tokenize_pairs(pairs, tok, max_length=max(len(c) for c, _ in tokenized))
    assert len(short) == sum(max(map(len, pair)) <= max(len(c) for c, _ in tokenized) for pair in tokenized)
    with pytest.raises(PreferenceDataError, match="longer than 5 tokens"):
        tokenize_pairs(pairs, tok, max_length=5)
