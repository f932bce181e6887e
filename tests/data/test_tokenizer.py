"""The tiny R1 tokenizer: special tokens, chat template, round trip, determinism, offline loading."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from r1mega.data.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
    USER,
    TokenizerError,
    load_tokenizer,
    pad_token_id,
    train_tokenizer,
)

CORPUS = [
    "Calculate 86 + 67 * 21.\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "67 * 21 = 1407, leaving 86 + 1407\n86 + 1407 = 1493\nSo the value is 1493.",
    "Emily can peel 12 shrimps a minute and saute 30 shrimps in 10 minutes. How long will it take her?",
    "Find the Greatest Common Divisor (GCD) of these numbers: 477, 303. The answer is \\boxed{3}.",
] * 25

CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "The answer is \\boxed{5}.", "reasoning": "2 + 3 = 5"},
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(CORPUS, vocab_size=400, out_dir=str(out))
    return out


def test_special_tokens_have_fixed_ids(trained: Path) -> None:
    tok = load_tokenizer(str(trained))
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(7))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    assert len(tok) <= 400
    for token in SPECIAL_TOKENS:  # each is one atomic token
        assert tok.encode(token, add_special_tokens=False) == [tok.convert_tokens_to_ids(token)]


def test_round_trip_and_digit_split(trained: Path) -> None:
    tok = load_tokenizer(str(trained))
    for text in ["Calculate 86 + 67 * 21.", "naïve café ×÷ 😀\n\n  tabs\tand spaces", "\\boxed{-14}"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    pieces = tok.convert_ids_to_tokens(tok.encode("1493", add_special_tokens=False))
    assert pieces == ["1", "4", "9", "3"]


def test_think_tags_survive_skip_special_tokens(trained: Path) -> None:
    tok = load_tokenizer(str(trained))
    ids = tok.encode(f"{BOS}{USER}q{ASSISTANT}{THINK_START}\nr\n{THINK_END}\n\na{EOS}", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == f"q{THINK_START}\nr\n{THINK_END}\n\na"


def test_auto_tokenizer_loads_chat_template(trained: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(trained), local_files_only=True)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        f"{BOS}You are helpful.{USER}What is 2 + 3?{ASSISTANT}"
        f"{THINK_START}\n2 + 3 = 5\n{THINK_END}\n\nThe answer is \\boxed{{5}}.{EOS}"
    )
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == f"{BOS}You are helpful.{USER}What is 2 + 3?{ASSISTANT}"
    plain = tok.apply_chat_template([CONVERSATION[1], {"role": "assistant", "content": "5"}], tokenize=False)
    assert plain == f"{BOS}{USER}What is 2 + 3?{ASSISTANT}5{EOS}"  # no reasoning: no think block


def test_training_is_deterministic(tmp_path: Path, trained: Path) -> None:
    train_tokenizer(CORPUS, vocab_size=400, out_dir=str(tmp_path))
    assert (tmp_path / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()


def test_too_small_vocab_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="at least"):
        train_tokenizer(CORPUS, vocab_size=100, out_dir=str(tmp_path))


def test_bare_tokenizer_json_gets_r1_format(trained: Path) -> None:
    tok = load_tokenizer(str(trained / "tokenizer.json"))
    assert tok.bos_token == BOS and tok.eos_token == EOS and tok.pad_token == PAD
    assert tok.apply_chat_template(CONVERSATION[1:2], tokenize=False) == f"{BOS}{USER}What is 2 + 3?"


def test_foreign_directory_keeps_its_template(tmp_path: Path, trained: Path) -> None:
    chatml = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tok = load_tokenizer(str(trained))
    tok.chat_template = chatml
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.chat_template == chatml
    assert pad_token_id(loaded) == loaded.eos_token_id  # no pad token: pad with EOS


def test_missing_or_unreadable_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="No tokenizer at"):
        load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(TokenizerError, match="No tokenizer at"):  # a hub id is never downloaded
        load_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="Could not read a tokenizer"):
        load_tokenizer(str(bad))
    with pytest.raises(TokenizerError, match="Could not read a tokenizer"):
        load_tokenizer(str(tmp_path))  # a directory without tokenizer files


def test_render_prompt_puts_the_system_turn_first_and_the_prefix_last(trained: Path) -> None:
    from r1mega.data.prompts import render_prompt

    tok = load_tokenizer(str(trained))
    plain = tok.decode(render_prompt(tok, "What is 2 + 3?", "<think>\n"))
    framed = tok.decode(render_prompt(tok, "What is 2 + 3?", "<think>\n", system="Answer in a box."))
    assert "Answer in a box." not in plain and framed.endswith(plain.rsplit("What is 2 + 3?", 1)[1])
    assert framed.index("Answer in a box.") < framed.index("What is 2 + 3?") < framed.rindex("<think>")
