"""Supervised fine-tuning data: JSONL conversations, loss masks from the chat template, packing and sampling.

The pipeline is ``read_sft_jsonl`` -> ``tokenize_examples`` -> ``pack`` -> ``SFTSampler`` -> ``make_batch``.
Two loss-mask conventions meet here. :func:`tokenize_example` returns a *token-aligned* mask (1 where
the token is one the model must learn to produce: an assistant turn's reasoning, answer and EOS).
The :data:`Batch` from :func:`make_batch` holds a *label-aligned* mask, as megatron's loss expects:
``loss_mask[t]`` weights predicting ``labels[t] = tokens[t + 1]``, so it is the token mask shifted by one,
and 0 at each document's last position (whose next token belongs to another document or is padding).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from r1mega.data.jsonl import read_records
from r1mega.utils.logging import get_logger

if TYPE_CHECKING:  # only for annotations: packing, batches and sampling do not need transformers
    from transformers import PreTrainedTokenizerFast

log = get_logger(__name__)

Batch = dict[str, torch.Tensor]
"""tokens, labels, loss_mask, position_ids (b, s) and attention_mask (b, 1, s, s); as ``r1mega.train.step``."""

ROLES = ("system", "user", "assistant")
TRUNCATION = ("drop", "truncate")
_RECORD_KEYS = {"messages", "prompt", "response", "reasoning", "id", "meta"}
_MESSAGE_KEYS = {"role", "content", "reasoning"}


class SFTDataError(ValueError):
    """Malformed SFT data, or data a tokenizer cannot render; the message names the place and the fix."""


@dataclass
class SFTExample:
    """One conversation to fine-tune on."""

    messages: list[dict[str, str]]
    """Turns in order: ``role`` (system, user or assistant), ``content``, and for assistant turns an optional
    ``reasoning`` (rendered inside ``<think>`` before the answer)."""
    id: str
    """Stable identifier: the record's ``id``, or ``<file name>:<line>`` when it has none."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata from the record (task, ground-truth answer, source, ...); not trained on."""


def parse_sft_record(record: object, default_id: str) -> SFTExample:
    """Check one decoded JSONL record and turn it into an :class:`SFTExample` (raises ``ValueError``).

    Accepted forms: ``{"messages": [{"role", "content", "reasoning"?}, ...]}`` or
    ``{"prompt", "response", "reasoning"?}``, each with optional ``id`` (string or integer) and ``meta`` (object).
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    unknown = set(record) - _RECORD_KEYS
    if unknown:
        raise ValueError(
            f"unknown field(s) {sorted(unknown)}; allowed: {sorted(_RECORD_KEYS)} (put extra data under 'meta')"
        )
    if "messages" in record:
        if {"prompt", "response", "reasoning"} & set(record):
            raise ValueError("give either 'messages' or 'prompt'/'response'/'reasoning', not both")
        messages = _parse_messages(record["messages"])
    elif "prompt" in record or "response" in record:
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"'{key}' must be a string (got {_kind(record.get(key))})")
        reasoning = record.get("reasoning")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"'reasoning' must be a string or null (got {_kind(reasoning)})")
        answer = {"role": "assistant", "content": record["response"]}
        if reasoning:
            answer["reasoning"] = reasoning
        messages = [{"role": "user", "content": record["prompt"]}, answer]
    else:
        raise ValueError("missing 'messages' (a list of turns) or 'prompt' and 'response'")
    example_id = record.get("id", default_id)
    if not isinstance(example_id, str | int) or isinstance(example_id, bool):
        raise ValueError(f"'id' must be a string or an integer (got {_kind(example_id)})")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"'meta' must be an object (got {_kind(meta)})")
    return SFTExample(messages=messages, id=str(example_id), meta=meta)


def _parse_messages(raw: object) -> list[dict[str, str]]:
    if not isinstance(raw, list):
        raise ValueError(f"'messages' must be a list of turns (got {_kind(raw)})")
    if not raw:
        raise ValueError("empty conversation: 'messages' has no turns")
    messages = []
    for i, turn in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where} must be an object with 'role' and 'content' (got {_kind(turn)})")
        if set(turn) - _MESSAGE_KEYS:
            raise ValueError(f"{where} has unknown field(s) {sorted(set(turn) - _MESSAGE_KEYS)}")
        if turn.get("role") not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)} (got {turn.get('role')!r})")
        if not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}.content must be a string (got {_kind(turn.get('content'))})")
        reasoning = turn.get("reasoning")
        if reasoning is not None and (turn["role"] != "assistant" or not isinstance(reasoning, str)):
            raise ValueError(f"{where}.reasoning must be a string, and only on assistant turns")
        if turn["role"] == "system" and i > 0:
            raise ValueError(f"{where}: a system message may only be the first turn")
        messages.append({k: v for k, v in turn.items() if v is not None})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: nothing to train on")
    return messages


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def read_sft_jsonl(path: str | Path, skip_malformed: bool = False) -> tuple[list[SFTExample], int]:
    """Read an SFT JSONL file: returns (examples, number of malformed lines skipped).

    A malformed line raises :class:`SFTDataError` naming ``file:line`` and what is wrong; with
    ``skip_malformed`` it is skipped, counted and logged instead. Blank lines are ignored.
    """
    return read_records(path, parse_sft_record, SFTDataError, "SFT", "example", skip_malformed)


def _render(tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


_REASONING_KEY: dict[str, str | None] = {}


def _reasoning_key(tokenizer: PreTrainedTokenizerFast) -> str | None:
    """The message key the chat template renders reasoning from (None: it renders none), probed once."""
    template = tokenizer.chat_template
    if template not in _REASONING_KEY:
        _REASONING_KEY[template] = None
        for key in ("reasoning", "reasoning_content"):
            probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", key: "R1MEGA-PROBE"}]
            if "R1MEGA-PROBE" in _render(tokenizer, probe, False):
                _REASONING_KEY[template] = key
                break
    return _REASONING_KEY[template]


def chat_messages(example: SFTExample, tokenizer: PreTrainedTokenizerFast) -> list[dict[str, str]]:
    """The example's turns as this tokenizer's chat template wants them.

    Templates that render a reasoning field get it under their key; for others (Qwen2.5, Llama) the
    reasoning is folded into the content as ``<think>\\n...\\n</think>\\n\\n`` so it is never lost.
    """
    if not tokenizer.chat_template:
        raise SFTDataError(
            "The tokenizer has no chat template: load one saved with a template (train_tokenizer or a "
            "Hugging Face model directory) or set tokenizer.chat_template."
        )
    key = _reasoning_key(tokenizer)
    messages = []
    for m in example.messages:
        m = dict(m)
        reasoning = m.pop("reasoning", None)
        if reasoning and key is not None:
            m[key] = reasoning
        elif reasoning:
            m["content"] = f"<think>\n{reasoning}\n</think>\n\n{m['content']}"
        messages.append(m)
    return messages


def tokenize_example(
    example: SFTExample,
    tokenizer: PreTrainedTokenizerFast,
    max_length: int | None = None,
    truncation: str = "drop",
) -> tuple[list[int], list[int]] | None:
    """Render ``example`` with the chat template and tokenize it: (input_ids, token-aligned loss mask).

    The mask is 1 on the tokens of each assistant turn (reasoning, answer and end-of-turn/EOS) and 0 on
    system, user and template tokens, including the ``<｜Assistant｜>`` tag that opens a turn (the prompt
    at generation time). Assistant spans are found by rendering the conversation up to each assistant
    turn with the generation prompt and up to its end without; a token belongs to the span its first
    character falls in (character offsets), so any fast tokenizer and prefix-stable template works.

    Longer than ``max_length`` tokens: ``truncation="drop"`` returns None; ``"truncate"`` keeps the first
    ``max_length`` tokens (the prompt, then as much of the answer as fits; the EOS is lost) and returns
    None only when no assistant token is left.
    """
    if truncation not in TRUNCATION:
        raise SFTDataError(f"truncation={truncation!r} is not a policy: use one of {', '.join(TRUNCATION)}.")
    messages = chat_messages(example, tokenizer)
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (upto.startswith(prefix) and text.startswith(upto)):
            raise SFTDataError(
                f"Example {example.id}: the chat template does not render a conversation's start the same way "
                "as the whole conversation, so assistant tokens cannot be located; use a prefix-stable template."
            )
        spans.append((len(prefix), len(upto)))  # characters of this assistant turn
    for m in example.messages:  # a template that silently drops reasoning would train without it
        if m.get("reasoning") and m["reasoning"] not in text:
            raise SFTDataError(f"Example {example.id}: the chat template dropped an assistant turn's reasoning.")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    loss_mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in encoding["offset_mapping"]]
    if max_length is not None and len(input_ids) > max_length:
        if truncation == "drop":
            return None
        input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]
        if not any(loss_mask):
            return None
    return input_ids, loss_mask


def tokenize_examples(
    examples: Sequence[SFTExample],
    tokenizer: PreTrainedTokenizerFast,
    max_length: int | None = None,
    truncation: str = "drop",
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """:func:`tokenize_example` over a dataset: (kept examples, number dropped as too long), logged."""
    kept = []
    for example in examples:
        tokens = tokenize_example(example, tokenizer, max_length, truncation)
        if tokens is not None:
            kept.append(tokens)
    dropped = len(examples) - len(kept)
    if dropped:
        log.warning(
            "Dropped %d of %d SFT example(s) longer than %s tokens (truncation=%s)",
            dropped,
            len(examples),
            max_length,
            truncation,
        )
    if not kept:
        raise SFTDataError(f"Every SFT example is longer than max_length={max_length}: raise it or truncate.")
    return kept, dropped


@dataclass
class PackedSequence:
    """One training row: whole documents laid end to end (padding is added by :func:`make_batch`)."""

    input_ids: list[int]
    """Token ids of the documents, concatenated."""
    loss_mask: list[int]
    """Token-aligned loss mask of the documents, concatenated."""
    doc_lengths: list[int]
    """Length of each document, in order; they sum to ``len(input_ids)``."""


def pack(
    examples_tokens: Sequence[tuple[list[int], list[int]]], seq_length: int, packing: bool = True
) -> list[PackedSequence]:
    """Lay tokenized documents into rows of at most ``seq_length`` tokens.

    With ``packing``, greedy first-fit in the given order: each document goes into the first row with
    room for it, else opens a new row. Without, one document per row. Documents are never split; one
    longer than ``seq_length`` is an error (tokenize with ``max_length <= seq_length``).
    """
    if not examples_tokens:
        raise SFTDataError("Nothing to pack: the tokenized dataset is empty.")
    longest = max(len(ids) for ids, _ in examples_tokens)
    if longest > seq_length:
        raise SFTDataError(
            f"A tokenized example has {longest} tokens, more than seq_length={seq_length}: "
            "tokenize with max_length at most seq_length."
        )
    rows: list[PackedSequence] = []
    open_rows: list[int] = []  # rows that may still take the shortest document
    shortest = min(len(ids) for ids, _ in examples_tokens)
    for ids, mask in examples_tokens:
        target = None
        if packing:
            target = next((r for r in open_rows if seq_length - len(rows[r].input_ids) >= len(ids)), None)
        if target is None:
            rows.append(PackedSequence([], [], []))
            target = len(rows) - 1
            open_rows.append(target)
        row = rows[target]
        row.input_ids.extend(ids)
        row.loss_mask.extend(mask)
        row.doc_lengths.append(len(ids))
        if not packing or seq_length - len(row.input_ids) < shortest:
            open_rows.remove(target)
    return rows


def make_batch(rows: Sequence[PackedSequence], seq_length: int, pad_id: int) -> Batch:
    """Tensors for one micro-batch of packed rows, right-padded to ``seq_length``.

    ``labels`` are next tokens within each document; a document's last position has the pad id as label
    and loss 0, so no loss crosses into the next document. ``position_ids`` restart at 0 per document.
    ``attention_mask`` is True where attention is *masked out* (megatron's convention): a token sees only
    earlier tokens of its own document; padding sees only itself (a fully masked row would give NaN).
    """
    b, s = len(rows), seq_length
    tokens = torch.full((b, s), pad_id, dtype=torch.long)  # (b, s)
    labels = torch.full((b, s), pad_id, dtype=torch.long)  # (b, s)
    loss_mask = torch.zeros(b, s)  # (b, s)
    position_ids = torch.zeros(b, s, dtype=torch.long)  # (b, s)
    doc_ids = torch.full((b, s), -1, dtype=torch.long)  # (b, s) document index in its row; -1 for padding
    for r, row in enumerate(rows):
        if len(row.input_ids) > s or sum(row.doc_lengths) != len(row.input_ids):
            raise SFTDataError(
                f"Row {r} has {len(row.input_ids)} tokens for seq_length={s}: pack with the same length."
            )
        start = 0
        for d, n in enumerate(row.doc_lengths):
            ids = torch.tensor(row.input_ids[start : start + n])  # (n,)
            mask = torch.tensor(row.loss_mask[start : start + n], dtype=torch.float)  # (n,)
            tokens[r, start : start + n] = ids
            labels[r, start : start + n - 1] = ids[1:]
            loss_mask[r, start : start + n - 1] = mask[1:]
            position_ids[r, start : start + n] = torch.arange(n)
            doc_ids[r, start : start + n] = d
            start += n
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "attention_mask": document_attention_mask(doc_ids),
    }


def document_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Per-document causal attention of packed rows, ``(b, s)`` document ids (-1 for padding) to a ``(b, 1, s, s)``
    mask, True where attention is *masked out* (megatron's convention): a token sees only earlier tokens of its own
    document; padding sees only itself (a fully masked row would give NaN)."""
    s = doc_ids.shape[1]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (b, s, s) query x key
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))  # (s, s)
    allowed = same_doc & causal & (doc_ids >= 0)[:, :, None]  # (b, s, s)
    allowed |= torch.eye(s, dtype=torch.bool)
    return ~allowed[:, None]  # (b, 1, s, s)


class SFTSampler:
    """Deterministic, resumable order of rows for data-parallel training.

    Each epoch is a seeded permutation of the rows; every optimizer step takes the next
    ``micro_batch_size * num_microbatches * dp_size`` rows of it (an epoch's tail that does not fill a
    step is skipped, as megatron's samplers do). Micro-batch ``m`` of DP rank ``r`` is global micro-batch
    ``m * dp_size + r`` of the step, so ranks get disjoint rows and the global batch does not depend on
    the DP size. The state (epoch, position) is the same on every rank; restoring it resumes exactly,
    even with a different DP size.
    """

    def __init__(self, num_samples: int, seed: int, dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True) -> None:
        if num_samples <= 0:
            raise SFTDataError("The sampler needs at least one row: the SFT dataset is empty.")
        if not 0 <= dp_rank < dp_size:
            raise SFTDataError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size}).")
        self.num_samples = num_samples
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.shuffle = shuffle
        self.epoch = 0
        """Epochs completed (the index of the current permutation)."""
        self.position = 0
        """Rows of the current epoch's permutation already handed out (over all ranks)."""
        self._order: tuple[int, list[int]] | None = None

    def _permutation(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            order = list(range(self.num_samples))
            if self.shuffle:
                random.Random(f"r1mega-sft:{self.seed}:{self.epoch}").shuffle(order)
            self._order = (self.epoch, order)
        return self._order[1]

    def microbatches(self, micro_batch_size: int, num_microbatches: int) -> list[list[int]]:
        """This rank's row indices for the next optimizer step: ``num_microbatches`` lists of ``micro_batch_size``."""
        step_rows = micro_batch_size * num_microbatches * self.dp_size
        if step_rows > self.num_samples:
            raise SFTDataError(
                f"One step needs {step_rows} rows (micro batch {micro_batch_size} x {num_microbatches} "
                f"micro-batches x DP {self.dp_size}) but the dataset has {self.num_samples}: "
                "lower the global batch size or add data."
            )
        if self.position + step_rows > self.num_samples:
            log.info("SFT epoch %d done; starting epoch %d", self.epoch, self.epoch + 1)
            self.epoch += 1
            self.position = 0
        rows = self._permutation()[self.position : self.position + step_rows]
        self.position += step_rows
        out = []
        for m in range(num_microbatches):
            start = (m * self.dp_size + self.dp_rank) * micro_batch_size
            out.append(rows[start : start + micro_batch_size])
        return out

    def state_dict(self) -> dict[str, int]:
        """Where the sampler stands (the same on every rank): epoch, position and what they refer to."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``; it must come from a sampler over the same rows, seed and shuffling."""
        for key, mine in (("num_samples", self.num_samples), ("seed", self.seed), ("shuffle", int(self.shuffle))):
            if state[key] != mine:
                raise SFTDataError(
                    f"The saved SFT sampler state has {key}={state[key]} but this run has {key}={mine}: "
                    "resume with the same data, seed and packing, or start the data order afresh."
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def load_sft_rows(
    path: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    seq_length: int,
    packing: bool = True,
    truncation: str = "drop",
    skip_malformed: bool = False,
    seed: int | None = None,
) -> list[PackedSequence]:
    """Read, tokenize (at most ``seq_length`` tokens each) and pack an SFT JSONL file into training rows.

    With a ``seed`` the documents are shuffled (deterministically) before packing, so rows mix the file.
    """
    examples, _ = read_sft_jsonl(path, skip_malformed=skip_malformed)
    tokenized, _ = tokenize_examples(examples, tokenizer, max_length=seq_length, truncation=truncation)
    if seed is not None:
        random.Random(f"r1mega-pack:{seed}").shuffle(tokenized)
    rows = pack(tokenized, seq_length, packing=packing)
    used = sum(len(r.input_ids) for r in rows)
    log.info(
        "SFT data %s: %d examples in %d rows of %d tokens (%.0f%% filled)",
        path,
        len(tokenized),
        len(rows),
        seq_length,
        100 * used / (len(rows) * seq_length),
    )
    return rows
