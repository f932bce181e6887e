"""A synthetic token stream with a learnable rule, for smoke runs and parallel-equivalence tests."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def synthetic_batch(batch_size: int, seq_length: int, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Sequences following ``x[t+1] = (x[t] * 5 + 3) % V`` from random starts: a model can learn it.

    Deterministic in ``seed``; labels are the next tokens, every position carries loss. The keys are
    ``r1mega.train.step.Batch``'s: tokens, labels, loss_mask and position_ids, each ``(b, s)``.
    """
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab_size, (batch_size, 1), generator=g)
    seq = [start]
    for _ in range(seq_length):
        seq.append((seq[-1] * 5 + 3) % vocab_size)
    stream = torch.cat(seq, dim=1)  # (b, s + 1)
    return {
        "tokens": stream[:, :-1].contiguous(),
        "labels": stream[:, 1:].contiguous(),
        "loss_mask": torch.ones(batch_size, seq_length),
        "position_ids": torch.arange(seq_length).unsqueeze(0).expand(batch_size, -1).contiguous(),
    }


def synthetic_microbatches(
    micro_batch_size: int, seq_length: int, vocab_size: int, seed: int, dp_rank: int, dp_size: int, step: int
) -> Iterator[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of one global step (endless; the schedule takes what it needs).

    Micro-batch ``i`` of rank ``r`` at ``step`` is the same tensor whatever the layout, so runs with
    different DP sizes see the same global batch.
    """
    index = 0
    while True:
        global_index = index * dp_size + dp_rank
        yield synthetic_batch(micro_batch_size, seq_length, vocab_size, seed=hash((seed, step, global_index)) % 2**31)
        index += 1
