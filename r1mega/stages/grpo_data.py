"""GRPO's per-step data: the samples, their micro-batches, and the rollout's statistics.

Micro-batches are prompt + response rows, one response per row (padded) or several (packed to a token budget).
Two layouts, one contract:

- **padded** (``grpo.micro_batch_tokens=null``): ``optim.micro_batch_size`` responses per micro-batch, one per
  row, right-padded to the longest;
- **packed** (``grpo.micro_batch_tokens=N``): responses laid end to end in rows of at most ``N`` tokens (first fit,
  longest first), one row per micro-batch. Positions restart at each response and attention is causal within a
  response (SFT's packing: :func:`r1mega.data.sft.document_attention_mask`), so each response's logits are its
  padded row's, and no padding is computed.

Either way the loss works in *response space*: ``index`` (n, t) points each of the micro-batch's n responses' t
label positions into the flattened ``(b * s)`` rows, and the per-token tensors (``mask``, old / reference /
rollout log-probabilities) are ``(n, t)``. Every loss aggregation mode (per-token or per-sequence means) thus sees
the same sequences whatever the layout, and the two layouts give the same loss and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from r1mega.data.prompts import Prompt
from r1mega.data.sft import document_attention_mask
from r1mega.rollout import Completion
from r1mega.utils.device import current_device

Batch = dict[str, torch.Tensor]
Plan = list[list[list[int]]]
"""Micro-batches, each a list of rows, each row a list of sample indices (an empty row: a micro-batch that
carries no response, run so that every rank makes the same number of forwards)."""


@dataclass
class Sample:
    """One response of a rollout batch."""

    prompt: Prompt
    prompt_ids: list[int]
    completion: Completion
    reward: float = 0.0
    values: dict[str, float] = field(default_factory=dict)
    advantage: float = 0.0
    ref_logprobs: list[float] | None = None
    old_logprobs: list[float] | None = None
    """The trainer's log-probabilities of the response before the updates (only with a rollout correction)."""
    trained: bool = True
    """False for responses excluded from the loss (overlong filtering)."""

    def __len__(self) -> int:
        """Tokens of prompt + response (the row space this sample takes)."""
        return len(self.prompt_ids) + len(self.completion.token_ids)


def plan_padded(count: int, micro_batch_size: int) -> Plan:
    """``count`` samples in order, ``micro_batch_size`` rows of one sample per micro-batch."""
    return [[[i] for i in range(s, min(s + micro_batch_size, count))] for s in range(0, count, micro_batch_size)]


def plan_packed(lengths: Sequence[int], budget: int) -> Plan:
    """First fit, longest first: rows of at most ``budget`` tokens, one row per micro-batch. A sample longer than
    the budget gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        target = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if target is None:
            rows.append([])
            room.append(budget)
            target = len(rows) - 1
        rows[target].append(i)
        room[target] -= lengths[i]
    return [[row] for row in rows]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def make_batch(rows: Sequence[Sequence[Sample]], width: int, pad_id: int, *, with_ref: bool, correct: bool) -> Batch:
    """Tensors of one micro-batch.

    Row space ``(b, s=width)``: ``tokens``, ``labels`` (next tokens within a response's own sequence, the pad id
    elsewhere), ``position_ids`` (restarting per sequence), ``loss_mask`` (1 at the trained response labels) and,
    when a row holds more than one sequence, ``attention_mask`` (b, 1, s, s; True = masked out).
    Response space ``(n, t)``, n responses in row order, t the longest: ``index`` into the flattened rows, ``mask``,
    ``lengths`` (n,) response tokens, ``old_logp`` (the trainer's when recorded, else the sampler's), ``ref_logp`` (``with_ref``), ``rollout_logp``
    (the sampler's, with a rollout ``correct``-ion); ``advantages`` (n,). An empty micro-batch gets one masked
    response so every tensor keeps its rank.
    """
    b = len(rows)
    samples = [s for row in rows for s in row]
    n, t = max(len(samples), 1), max((len(s.completion.token_ids) for s in samples), default=1)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)  # (b, s)
    labels = torch.full((b, width), pad_id, dtype=torch.long)  # (b, s)
    positions = torch.arange(width).repeat(b, 1)  # (b, s)
    loss_mask = torch.zeros(b, width)  # (b, s)
    doc_ids = torch.full((b, width), -1, dtype=torch.long)  # (b, s)
    index = torch.zeros(n, t, dtype=torch.long)  # (n, t)
    mask, old, ref, rollout = (torch.zeros(n, t) for _ in range(4))  # (n, t) each
    k = 0
    for r, row in enumerate(rows):
        offset = 0
        for d, s in enumerate(row):
            seq = torch.tensor(s.prompt_ids + s.completion.token_ids)  # (L,)
            size, m = len(seq), len(s.completion.token_ids)
            if offset + size > width:
                raise ValueError(f"row {r} needs {offset + size} tokens, more than its width {width}")
            tokens[r, offset : offset + size] = seq
            labels[r, offset : offset + size - 1] = seq[1:]
            positions[r, offset : offset + size] = torch.arange(size)
            doc_ids[r, offset : offset + size] = d
            start = offset + len(s.prompt_ids) - 1  # the label position of the first response token
            loss_mask[r, start : start + m] = float(s.trained)
            index[k, :m] = r * width + start + torch.arange(m)
            mask[k, :m] = float(s.trained)
            old[k, :m] = torch.tensor(s.old_logprobs or s.completion.logprobs)  # the trainer's when recorded
            rollout[k, :m] = torch.tensor(s.completion.logprobs)
            if with_ref and s.ref_logprobs is not None:
                ref[k, :m] = torch.tensor(s.ref_logprobs)
            offset += size
            k += 1
    batch = {
        "tokens": tokens,
        "labels": labels,
        "position_ids": positions,
        "loss_mask": loss_mask,
        "index": index,
        "mask": mask,
        "lengths": torch.tensor([len(s.completion.token_ids) for s in samples] or [0]),
        "old_logp": old,
        "advantages": torch.tensor([s.advantage for s in samples] or [0.0]),
    }
    if any(len(row) > 1 for row in rows):
        batch["attention_mask"] = document_attention_mask(doc_ids)
    if with_ref:
        batch["ref_logp"] = ref
    if correct:
        batch["rollout_logp"] = rollout
    return batch


def response_values(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A row-space quantity ``(b, s)`` (log-probabilities, entropy) at each response's label positions: ``(n, t)``."""
    return rows.reshape(-1)[index]  # (n, t)


def padded_columns(*columns: Sequence[Sequence[float]]) -> tuple[torch.Tensor, ...]:
    """Ragged per-response lists (the first column sets the lengths) as ``(n, t)`` tensors, zero-padded, and the
    ``(n, t)`` boolean mask of real entries last."""
    width = max(len(row) for row in columns[0])
    out = []
    for rows in columns:
        t = torch.zeros(len(rows), width)  # (n, t)
        for i, row in enumerate(rows):
            t[i, : len(row)] = torch.tensor(row)
        out.append(t)
    mask = torch.zeros(len(columns[0]), width, dtype=torch.bool)  # (n, t)
    for i, row in enumerate(columns[0]):
        mask[i, : len(row)] = True
    return (*out, mask)


def rollout_metrics(
    samples: Sequence[Sample],
    stats: dict[str, float],
    timing: dict[str, float],
    dp_group: torch.distributed.ProcessGroup,
    updates_per_step: int,
) -> tuple[dict[str, float], int]:
    """The step's rollout metrics over the data-parallel group (one all-reduce) and its prompt + response tokens.

    ``stats``: ``zero_variance_groups`` and ``groups_sampled`` of this rank's sampling rounds; ``timing``: the
    step's ``rollout_s``, ``reward_s`` and ``train_s`` (reported as they are).
    """
    lengths = [len(s.completion.token_ids) for s in samples]
    sums = torch.tensor(
        [
            len(samples),
            sum(s.reward for s in samples),
            sum(s.reward**2 for s in samples),
            sum(s.values.get("accuracy", 0.0) for s in samples),
            sum(s.values.get("format", 0.0) for s in samples),
            sum(lengths),
            sum(s.completion.finish_reason == "length" for s in samples),
            stats["zero_variance_groups"],
            stats["groups_sampled"],
            sum(len(s.prompt_ids) for s in samples),
        ],
        dtype=torch.float64,
        device=current_device(),
    )
    torch.distributed.all_reduce(sums, group=dp_group)
    n, r, r2, acc, fmt, tok, cut, zero, sampled, prompt_tok = sums.tolist()
    mean = r / n
    metrics = {
        "reward_mean": mean,
        "reward_std": max(r2 / n - mean**2, 0.0) ** 0.5,
        "accuracy": acc / n,
        "format_rate": fmt / n,
        "response_length": tok / n,
        "clipped_rate": cut / n,
        "zero_variance_groups": zero / max(sampled, 1),
        "rollout_tokens_per_s": tok / max(timing["rollout_s"], 1e-9),
        "train_tokens_per_s": updates_per_step * (tok + prompt_tok) / max(timing["train_s"], 1e-9),
        **timing,
    }
    return metrics, int(tok + prompt_tok)
