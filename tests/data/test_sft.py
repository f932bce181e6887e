"""SFT data: JSONL validation, assistant-only loss masks, packing boundaries and the resumable sampler."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from r1mega.data.sft import (
    PackedSequence,
    SFTDataError,
    SFTExample,
    SFTSampler,
    load_sft_rows,
    make_batch,
    pack,
    read_sft_jsonl,
    tokenize_example,
    tokenize_examples,
)
from r1mega.data.tokenizer import ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER, load_tokenizer, train_tokenizer

CORPUS = ["What is 2 + 3? The answer is \\boxed{5}. Then 12 * 4 = 48 and the total is 53."] * 40

TWO_TURNS = SFTExample(
    messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "\\boxed{5}", "reasoning": "2 + 3 = 5"},
        {"role": "user", "content": "And 12 * 4?"},
        {"role": "assistant", "content": "\\boxed{48}"},
    ],
    id="two-turns",
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(CORPUS, vocab_size=300, out_dir=str(out))
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> PreTrainedTokenizerFast:
    return load_tokenizer(str(tok_dir))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- reading


def test_reads_both_forms(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "p", "response": "r", "reasoning": "think", "id": 7, "meta": {"task": "t"}}),
            "",
            json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}),
        ],
    )
    examples, skipped = read_sft_jsonl(path)
    assert skipped == 0 and len(examples) == 2
    assert examples[0].id == "7" and examples[0].meta == {"task": "t"}
    assert examples[0].messages == [
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "r", "reasoning": "think"},
    ]
    assert examples[1].id == "d.jsonl:3"  # no id: file name and line


GOOD = json.dumps({"prompt": "p", "response": "r"})
MALFORMED = {
    "bad json": ('{"prompt": "p", "response": ', "not valid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "missing response": ('{"prompt": "p"}', "'response' must be a string"),
    "missing everything": ('{"id": "x"}', "missing 'messages'"),
    "wrong content type": ('{"messages": [{"role": "user", "content": 3}]}', "messages[0].content must be a string"),
    "empty conversation": ('{"messages": []}', "empty conversation"),
    "no assistant turn": ('{"messages": [{"role": "user", "content": "u"}]}', "no assistant turn"),
    "unknown role": ('{"messages": [{"role": "bot", "content": "u"}]}', "messages[0].role must be one of"),
    "typo in a field": ('{"prompt": "p", "response": "r", "reasonig": "x"}', "unknown field(s) ['reasonig']"),
    "late system turn": (
        '{"messages": [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}, '
        '{"role": "assistant", "content": "a"}]}',
        "system message may only be the first turn",
    ),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_line_names_file_and_line(tmp_path: Path, kind: str) -> None:
    line, reason = MALFORMED[kind]
    path = write_lines(tmp_path / "data.jsonl", [GOOD, GOOD, line])
    with pytest.raises(SFTDataError) as err:
        read_sft_jsonl(path)
    assert f"{path}:3: " in str(err.value) and reason in str(err.value)


def test_skip_mode_counts_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [GOOD, *(line for line, _ in MALFORMED.values()), GOOD]
    path = write_lines(tmp_path / "data.jsonl", lines)
    logger = logging.getLogger("r1mega.data.jsonl")
    logger.addHandler(caplog.handler)
    try:
        examples, skipped = read_sft_jsonl(path, skip_malformed=True)
    finally:
        logger.removeHandler(caplog.handler)
    assert len(examples) == 2 and skipped == len(MALFORMED)
    assert f"{path}:2:" in caplog.text and f"Skipped {len(MALFORMED)} malformed line(s)" in caplog.text


def test_missing_file_and_all_malformed(tmp_path: Path) -> None:
    with pytest.raises(SFTDataError, match="No SFT data file"):
        read_sft_jsonl(tmp_path / "none.jsonl")
    with pytest.raises(SFTDataError, match="no usable SFT example"):
        read_sft_jsonl(write_lines(tmp_path / "bad.jsonl", ["{}"]), skip_malformed=True)


# ---------------------------------------------------------------- loss masks


def test_loss_only_on_assistant_tokens(tok: PreTrainedTokenizerFast) -> None:
    ids, mask = tokenize_example(TWO_TURNS, tok)
    assert len(ids) == len(mask)
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    not_trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert trained == f"{THINK_START}\n2 + 3 = 5\n{THINK_END}\n\n\\boxed{{5}}{EOS}\\boxed{{48}}{EOS}"
    assert not_trained == f"{BOS}Be brief.{USER}What is 2 + 3?{ASSISTANT}{USER}And 12 * 4?{ASSISTANT}"
    # Hand check at the token level: the prompt (up to and including <｜Assistant｜>) is exactly the untrained head.
    prompt = tok.encode(f"{BOS}Be brief.{USER}What is 2 + 3?{ASSISTANT}", add_special_tokens=False)
    assert ids[: len(prompt)] == prompt and mask[: len(prompt)] == [0] * len(prompt)
    assert ids[len(prompt)] == tok.convert_tokens_to_ids(THINK_START) and mask[len(prompt)] == 1
    eos = tok.convert_tokens_to_ids(EOS)
    assert ids[-1] == eos and mask[-1] == 1
    assert [m for t, m in zip(ids, mask, strict=True) if t == eos] == [1, 1]


def test_foreign_template_folds_reasoning(tok_dir: Path) -> None:
    tok = load_tokenizer(str(tok_dir))  # a private copy: the template changes
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    example = SFTExample(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "r"}], "x"
    )
    ids, mask = tokenize_example(example, tok)
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained == f"{THINK_START}\nr\n{THINK_END}\n\na<|im_end|>\n"


def test_truncation_policies(tok: PreTrainedTokenizerFast) -> None:
    ids, mask = tokenize_example(TWO_TURNS, tok)
    assert tokenize_example(TWO_TURNS, tok, max_length=len(ids)) == (ids, mask)
    assert tokenize_example(TWO_TURNS, tok, max_length=len(ids) - 1) is None  # drop
    cut = tokenize_example(TWO_TURNS, tok, max_length=len(ids) - 1, truncation="truncate")
    assert cut == (ids[:-1], mask[:-1])  # the prompt is kept, the end of the answer goes
    assert tokenize_example(TWO_TURNS, tok, max_length=3, truncation="truncate") is None  # only prompt fits
    with pytest.raises(SFTDataError, match="not a policy"):
        tokenize_example(TWO_TURNS, tok, truncation="left")


def test_tokenize_examples_counts_dropped(tok: PreTrainedTokenizerFast) -> None:
    short = SFTExample([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "short")
    kept, dropped = tokenize_examples([short, TWO_TURNS, short], tok, max_length=20)
    assert len(kept) == 2 and dropped == 1
    with pytest.raises(SFTDataError, match="longer than max_length"):
        tokenize_examples([TWO_TURNS], tok, max_length=5)


# ---------------------------------------------------------------- packing and batches


def doc(n: int, start: int, trained_from: int = 1) -> tuple[list[int], list[int]]:
    """A fake document of n distinct token ids; loss on tokens from index ``trained_from``."""
    return list(range(start, start + n)), [int(i >= trained_from) for i in range(n)]


def test_first_fit_packing() -> None:
    docs = [doc(5, 10), doc(3, 20), doc(4, 30), doc(2, 40), doc(1, 50)]
    rows = pack(docs, seq_length=8)
    assert [r.doc_lengths for r in rows] == [[5, 3], [4, 2, 1]]
    assert rows[0].input_ids == docs[0][0] + docs[1][0]
    assert [r.doc_lengths for r in pack(docs, 8, packing=False)] == [[5], [3], [4], [2], [1]]
    with pytest.raises(SFTDataError, match="more than seq_length=4"):
        pack(docs, seq_length=4)


def test_batch_keeps_documents_apart() -> None:
    pad, s = 0, 8
    rows = pack([doc(3, 10), doc(4, 20), doc(5, 30)], s)
    assert rows[1] == PackedSequence(*doc(5, 30), doc_lengths=[5])
    batch = make_batch(rows, s, pad)
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}
    assert batch["tokens"][0].tolist() == [10, 11, 12, 20, 21, 22, 23, pad]
    assert batch["labels"][0].tolist() == [11, 12, pad, 21, 22, 23, pad, pad]  # no label crosses documents
    # token mask [0,1,1 | 0,1,1,1] shifted onto labels; 0 at each document's end and on padding
    assert batch["loss_mask"][0].tolist() == [1, 1, 0, 1, 1, 1, 0, 0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 0, 0, 0]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, s, s) and mask.dtype == torch.bool
    doc_of = [0, 0, 0, 1, 1, 1, 1, -1]
    for q in range(s):
        for k in range(s):
            if doc_of[q] < 0:
                allowed = q == k  # padding sees only itself
            else:
                allowed = doc_of[q] == doc_of[k] and k <= q
            assert mask[0, 0, q, k].item() == (not allowed), (q, k)


def attend(batch: dict[str, torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """Uniform-score attention under the batch's mask: each position averages the values it may see."""
    scores = torch.zeros(batch["attention_mask"].shape).masked_fill(batch["attention_mask"], float("-inf"))
    return torch.softmax(scores, dim=-1)[:, 0] @ values  # (b, s, d)


def test_mask_blocks_attention_across_documents() -> None:
    s = 10
    batch = make_batch(pack([doc(4, 10), doc(3, 20), doc(2, 30)], s), s, pad_id=0)
    values = torch.randn(1, s, 5)
    out = attend(batch, values)
    changed = values.clone()
    changed[:, 0:4] += 100.0  # rewrite the first document
    out2 = attend(batch, changed)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 4:], out2[:, 4:])  # later documents and padding do not see it
    assert not torch.allclose(out[:, :4], out2[:, :4])
    assert torch.allclose(out[:, 4], values[:, 4])  # a document's first token sees only itself


def test_batch_from_real_example_shifts_token_mask(tok: PreTrainedTokenizerFast) -> None:
    ids, mask = tokenize_example(TWO_TURNS, tok)
    s = len(ids) + 5
    batch = make_batch(pack([(ids, mask)], s, packing=False), s, pad_id=tok.pad_token_id)
    n = len(ids)
    assert batch["loss_mask"][0, : n - 1].tolist() == [float(m) for m in mask[1:]]
    assert batch["loss_mask"][0, n - 1 :].sum() == 0
    labels = batch["labels"][0]
    trained = labels[batch["loss_mask"][0].bool()].tolist()
    assert trained == [t for t, m in zip(ids, mask, strict=True) if m]  # exactly the assistant tokens


def test_load_sft_rows_end_to_end(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    record = {"prompt": "What is 2 + 3?", "response": "\\boxed{5}", "reasoning": "2 + 3 = 5"}
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(record)] * 6)
    length = len(tokenize_example(read_sft_jsonl(path)[0][0], tok)[0])
    rows = load_sft_rows(path, tok, seq_length=2 * length, seed=0)
    assert len(rows) == 3 and all(r.doc_lengths == [length, length] for r in rows)
    assert len(load_sft_rows(path, tok, seq_length=2 * length, packing=False)) == 6


# ---------------------------------------------------------------- sampler


def run(sampler: SFTSampler, steps: int, mbs: int = 2, nmb: int = 2) -> list[list[list[int]]]:
    return [sampler.microbatches(mbs, nmb) for _ in range(steps)]


def test_sampler_is_deterministic_and_covers_each_epoch() -> None:
    a, b = SFTSampler(24, seed=5), SFTSampler(24, seed=5)
    assert run(a, 12) == run(b, 12)
    assert run(SFTSampler(24, seed=5), 6) != run(SFTSampler(24, seed=6), 6)
    epoch = [i for step in run(SFTSampler(24, seed=5), 6) for mb in step for i in mb]
    assert sorted(epoch) == list(range(24))  # 6 steps of 4 rows: one full epoch
    nxt = SFTSampler(24, seed=5)
    run(nxt, 6)
    assert [i for step in run(nxt, 6) for mb in step for i in mb] != epoch  # a new order next epoch


@pytest.mark.parametrize("steps_before", [3, 7, 10])  # mid-epoch, just after a boundary, later
def test_sampler_resumes_exactly(steps_before: int) -> None:
    straight = SFTSampler(30, seed=1, dp_rank=1, dp_size=2)
    expected = run(straight, steps_before + 6)[steps_before:]
    first = SFTSampler(30, seed=1, dp_rank=1, dp_size=2)
    run(first, steps_before)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = SFTSampler(30, seed=1, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    assert run(resumed, 6) == expected


def test_data_parallel_ranks_are_disjoint_and_layout_free() -> None:
    dp = 4
    ranks = [SFTSampler(64, seed=3, dp_rank=r, dp_size=dp) for r in range(dp)]
    single = SFTSampler(64, seed=3)
    for _ in range(5):
        per_rank = [s.microbatches(2, 3) for s in ranks]
        rows = [i for step in per_rank for mb in step for i in mb]
        assert len(rows) == len(set(rows)) == 2 * 3 * dp
        one = single.microbatches(2, 3 * dp)  # the same global batch on one rank
        assert [i for mb in one for i in mb] == [i for m in range(3) for r in range(dp) for i in per_rank[r][m]]
    assert len({json.dumps(s.state_dict()) for s in ranks}) == 1  # the same state on every rank


def test_sampler_refuses_mismatched_state_and_oversized_steps() -> None:
    sampler = SFTSampler(10, seed=0)
    with pytest.raises(SFTDataError, match="num_samples=12"):
        sampler.load_state_dict({**sampler.state_dict(), "num_samples": 12})
    with pytest.raises(SFTDataError, match="seed=9"):
        sampler.load_state_dict({**sampler.state_dict(), "seed": 9})
    with pytest.raises(SFTDataError, match="One step needs 12 rows"):
        sampler.microbatches(4, 3)
    with pytest.raises(SFTDataError, match="dp_rank=2"):
        SFTSampler(10, seed=0, dp_rank=2, dp_size=2)
