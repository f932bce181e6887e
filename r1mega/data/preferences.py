"""Preference pairs for reward-model training: the JSONL format, tokenization, batches, and a generator.

A record is one line of JSONL::

    {"id": "gcd-s0-000189-rambling", "prompt": "...", "chosen": "<think>\\n...\\n</think>\\n\\n...",
     "rejected": "...", "meta": {...}}

``chosen`` and ``rejected`` are whole assistant responses (a ``<think>`` block included, if any) to the user
``prompt``; ``meta`` is optional and free-form. A response is scored as the conversation
``[user: prompt, assistant: response]`` rendered by the tokenizer's chat template (:func:`response_ids`), so
the sequence ends with the template's end-of-turn token (R1: EOS), where the reward model reads its score.
The GRPO reward renders rollouts through the same function, so training and scoring see the same tokens.

The generator (:func:`make_pairs`, ``r1mega-make-preferences``) builds a tiny offline set from the
cold-start records (``r1mega.data.coldstart``): ``chosen`` is the record's clean answer
``<think>\\nreasoning\\n</think>\\n\\nThe answer is \\boxed{..}.``; ``rejected`` is one of
:data:`REJECTION_KINDS`, a corruption of that answer:

- ``unclosed_think``: the ``</think>`` is missing;
- ``double_think``: the reasoning is split over two ``<think>`` blocks;
- ``rambling``: the reasoning is repeated with filler between lines (about twice as long);
- ``mixed_language``: Chinese and Russian phrases are mixed into the reasoning;
- ``wrong_answer``: the boxed answer differs from the reasoning's result.

So the preferred answer is concise, well formatted, in one language and correct, as in R1's preference
alignment. Everything is deterministic in the seed and the records.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from r1mega.data.jsonl import read_records
from r1mega.data.sft import SFTDataError, parse_sft_record
from r1mega.utils.logging import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = get_logger(__name__)

Batch = dict[str, torch.Tensor]
"""tokens, position_ids (2m, s) with rows chosen_0, rejected_0, chosen_1, ...; last (2m,): each row's last token."""

REJECTION_KINDS = ("unclosed_think", "double_think", "rambling", "mixed_language", "wrong_answer")
"""How :func:`make_pairs` corrupts a clean answer into a rejected one (see the module docstring)."""

_RECORD_KEYS = {"id", "prompt", "chosen", "rejected", "meta"}
_FILLERS = (
    "Wait, let me re-check that.",
    "Hmm, let me go over this again to be sure.",
    "Actually, let me think about it once more.",
    "Let me verify each step again carefully.",
    "Okay, so once more from the start.",
)
_FOREIGN = ("所以我们计算", "然后", "因此答案是", "Итак, считаем", "теперь проверим", "следовательно", "我们得到")


class PreferenceDataError(SFTDataError):
    """Malformed preference data; the message names ``file:line`` and the fix."""


@dataclass(frozen=True)
class PreferencePair:
    """Two responses to one prompt, the first preferred."""

    id: str
    """Stable identifier: the record's ``id``, or ``<file name>:<line>`` when it has none."""
    prompt: str
    """The user prompt (without the chat template)."""
    chosen: str
    """The preferred assistant response."""
    rejected: str
    """The other response."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata (the generator records the rejection ``kind``, ``task`` and ``source_id``)."""

    def to_json(self) -> dict[str, Any]:
        """The JSONL record of this pair."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "meta": self.meta,
        }


def parse_preference_record(record: object, default_id: str) -> PreferencePair:
    """Check one decoded JSONL record and turn it into a :class:`PreferencePair` (raises ``ValueError``)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    unknown = set(record) - _RECORD_KEYS
    if unknown:
        raise ValueError(
            f"unknown field(s) {sorted(unknown)}; allowed: {sorted(_RECORD_KEYS)} (put extra data under 'meta')"
        )
    for key in ("prompt", "chosen", "rejected"):
        value = record.get(key)
        if not isinstance(value, str):
            raise ValueError(f"'{key}' must be a string (got {'nothing' if value is None else type(value).__name__})")
        if not value.strip():
            raise ValueError(f"'{key}' is blank: give the text")
    if record["chosen"] == record["rejected"]:
        raise ValueError("'chosen' and 'rejected' are the same text: a pair needs two different responses")
    pair_id = record.get("id", default_id)
    if not isinstance(pair_id, str | int) or isinstance(pair_id, bool):
        raise ValueError(f"'id' must be a string or an integer (got {type(pair_id).__name__})")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"'meta' must be an object (got {type(meta).__name__})")
    return PreferencePair(str(pair_id), record["prompt"], record["chosen"], record["rejected"], meta)


def read_preferences(path: str | Path, skip_malformed: bool = False) -> list[PreferencePair]:
    """Read a preference JSONL file; a malformed line raises :class:`PreferenceDataError` naming ``file:line``
    (with ``skip_malformed`` it is skipped, counted and logged instead). Blank lines are ignored."""
    return read_records(path, parse_preference_record, PreferenceDataError, "preference", "pair", skip_malformed)[0]


# ---- tokens and batches ---------------------------------------------------------------------------------


def response_ids(tokenizer: PreTrainedTokenizerFast, prompt: str, response: str) -> list[int]:
    """Token ids of ``[user: prompt, assistant: response]`` rendered by the chat template (no generation prompt).

    The response goes in as the assistant's content, ``<think>`` block included, which R1's template renders
    exactly as it renders a separate reasoning field.
    """
    if not tokenizer.chat_template:
        raise PreferenceDataError(
            "The tokenizer has no chat template: load one saved with a template (train_tokenizer or a "
            "Hugging Face model directory)."
        )
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


TokenizedPair = tuple[list[int], list[int]]
"""(chosen ids, rejected ids) of one pair."""


def tokenize_pairs(
    pairs: Sequence[PreferencePair], tokenizer: PreTrainedTokenizerFast, max_length: int
) -> list[TokenizedPair]:
    """Both sides of each pair as token ids; pairs with a side longer than ``max_length`` are dropped and
    logged (cutting a response would remove the end-of-turn token the score is read at)."""
    kept = []
    for pair in pairs:
        chosen, rejected = (response_ids(tokenizer, pair.prompt, r) for r in (pair.chosen, pair.rejected))
        if max(len(chosen), len(rejected)) <= max_length:
            kept.append((chosen, rejected))
    dropped = len(pairs) - len(kept)
    if dropped:
        log.warning(
            "Dropped %d of %d preference pair(s) with a side longer than %d tokens", dropped, len(pairs), max_length
        )
    if not kept:
        raise PreferenceDataError(
            f"Every preference pair has a side longer than {max_length} tokens: raise data.seq_length."
        )
    return kept


def pad_rows(rows: Sequence[list[int]], pad_id: int, multiple_of: int = 1) -> Batch:
    """Token rows right-padded to the longest (rounded up to ``multiple_of``, e.g. the TP size under sequence
    parallelism), with positions and each row's ``last`` real position (kept explicitly: the pad id may be EOS)."""
    width = -(-max(map(len, rows)) // multiple_of) * multiple_of
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (b, s)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids)
    return {
        "tokens": tokens,
        "position_ids": torch.arange(width)[None].expand(len(rows), width),  # (b, s)
        "last": torch.tensor([len(ids) - 1 for ids in rows]),  # (b,)
    }


def make_pair_batch(pairs: Sequence[TokenizedPair], pad_id: int, multiple_of: int = 1) -> Batch:
    """One micro-batch of pairs: :func:`pad_rows` of the rows chosen_0, rejected_0, chosen_1, rejected_1, ..."""
    return pad_rows([ids for pair in pairs for ids in pair], pad_id, multiple_of)


# ---- the generator --------------------------------------------------------------------------------------


def clean_response(reasoning: str, response: str) -> str:
    """R1's well-formatted answer: one think block, then the answer."""
    return f"<think>\n{reasoning}\n</think>\n\n{response}"


def _wrong_answer(answer: str, rng: random.Random) -> str:
    """A different answer of the same shape: an integer moved by a small amount, else one digit changed."""
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + rng.choice([-3, -2, -1, 1, 2, 3, 10]))
    digits = [i for i, c in enumerate(answer) if c.isdigit()]
    if not digits:
        return answer + "0"
    i = rng.choice(digits)
    return answer[:i] + str((int(answer[i]) + rng.randint(1, 9)) % 10) + answer[i + 1 :]


def corrupt(record: dict[str, Any], kind: str, rng: random.Random) -> str:
    """The rejected response of ``kind`` (one of :data:`REJECTION_KINDS`) for a cold-start ``record``."""
    reasoning, response = record["reasoning"], record["response"]
    lines = reasoning.split("\n")
    if kind == "unclosed_think":
        return f"<think>\n{reasoning}\n\n{response}"
    if kind == "double_think":
        half = max(len(lines) // 2, 1)
        first, second = "\n".join(lines[:half]), "\n".join(lines[half:]) or reasoning
        return f"<think>\n{first}\n</think>\n<think>\n{second}\n</think>\n\n{response}"
    if kind == "rambling":
        padded: list[str] = []
        for _ in range(2):  # the reasoning twice, with filler between lines
            for line in lines:
                padded += [line, rng.choice(_FILLERS)] if rng.random() < 0.5 else [line]
        return clean_response("\n".join(padded), response)
    if kind == "mixed_language":
        mixed = [
            f"{line} {rng.choice(_FOREIGN)}" if rng.random() < 0.6 or i == 0 else line for i, line in enumerate(lines)
        ]
        return clean_response("\n".join(mixed), response)
    if kind == "wrong_answer":
        answer = str(record["meta"]["answer"])
        wrong = _wrong_answer(answer, rng)
        return clean_response(reasoning, response.replace(f"\\boxed{{{answer}}}", f"\\boxed{{{wrong}}}"))
    raise PreferenceDataError(f"Unknown rejection kind {kind!r}: choose from {', '.join(REJECTION_KINDS)}.")


def make_pairs(
    records: Sequence[dict[str, Any]],
    seed: int = 0,
    kinds: Sequence[str] = REJECTION_KINDS,
    pairs_per_record: int = 1,
) -> list[PreferencePair]:
    """Preference pairs from cold-start records: ``pairs_per_record`` pairs per record, the clean answer
    against corruptions of different ``kinds``.

    Kinds are dealt round-robin from a seeded shuffle, so every kind gets about the same number of pairs;
    each pair's random choices come from a generator seeded by (seed, record id, kind), so a pair does not
    depend on the other records.
    """
    unknown = [k for k in kinds if k not in REJECTION_KINDS]
    if unknown or not kinds:
        raise PreferenceDataError(f"Unknown rejection kind(s) {unknown}: choose from {', '.join(REJECTION_KINDS)}.")
    if not 1 <= pairs_per_record <= len(kinds):
        raise PreferenceDataError(
            f"pairs_per_record={pairs_per_record}: give 1 to {len(kinds)} (one per kind at most)."
        )
    order = list(kinds)
    random.Random(f"r1mega-pref-kinds:{seed}").shuffle(order)
    pairs = []
    for i, record in enumerate(records):
        for j in range(pairs_per_record):
            kind = order[(i * pairs_per_record + j) % len(order)]
            rng = random.Random(f"r1mega-pref:{seed}:{record['id']}:{kind}")
            chosen = clean_response(record["reasoning"], record["response"])
            meta = {"kind": kind, "task": record.get("meta", {}).get("task"), "source_id": record["id"]}
            pairs.append(
                PreferencePair(f"{record['id']}-{kind}", record["prompt"], chosen, corrupt(record, kind, rng), meta)
            )
    return pairs


def _cold_start_record(record: Any, default_id: str) -> dict[str, Any]:
    """A cold-start SFT record as written by ``r1mega-make-cold-start`` (checked as SFT data), kept as a dict."""
    parse_sft_record(record, default_id)
    if not isinstance(record.get("meta"), dict) or "answer" not in record["meta"] or "id" not in record:
        raise ValueError(
            "not a cold-start record (needs 'id' and 'meta.answer'): write one with r1mega-make-cold-start"
        )
    return record


def _read_records(path: Path, limit: int, seed: int) -> list[dict[str, Any]]:
    records = read_records(path, _cold_start_record, PreferenceDataError, "cold-start", "record")[0]
    # A chosen response is R1's clean answer: records whose answer is not boxed (--unboxed-share) are left out.
    records = [r for r in records if not r.get("meta", {}).get("unboxed")]
    random.Random(f"r1mega-pref-sample:{seed}:{path.name}").shuffle(records)
    return records[:limit] if limit else records


def write_preferences(
    cold_start_dir: str,
    out_dir: str,
    num_train: int = 1000,
    num_eval: int = 100,
    seed: int = 0,
    kinds: Sequence[str] = REJECTION_KINDS,
    pairs_per_record: int = 1,
) -> dict[str, Any]:
    """Write ``train.jsonl`` and ``eval.jsonl`` of preference pairs and ``manifest.json`` into ``out_dir``.

    Training pairs come from ``num_train`` records of the cold-start ``train.jsonl``, held-out pairs from
    ``num_eval`` records of its ``eval.jsonl`` (0: all), so the two splits share no prompt. Returns the
    manifest (sizes and pairs per kind), deterministic like the pairs.
    """
    src, out = Path(cold_start_dir), Path(out_dir)
    splits = {
        "train": make_pairs(_read_records(src / "train.jsonl", num_train, seed), seed, kinds, pairs_per_record),
        "eval": make_pairs(_read_records(src / "eval.jsonl", num_eval, seed), seed + 1, kinds, pairs_per_record),
    }
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"source": str(src), "seed": seed, "pairs_per_record": pairs_per_record}
    for name, pairs in splits.items():
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for pair in pairs:
                f.write(json.dumps(pair.to_json(), ensure_ascii=False) + "\n")
        manifest[name] = {"pairs": len(pairs), "kinds": {k: sum(p.meta["kind"] == k for p in pairs) for k in kinds}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("Preference pairs in %s: %d train, %d eval", out, len(splits["train"]), len(splits["eval"]))
    return manifest
