"""Decoding with several row groups in flight through the pipeline stages.

Under pipeline parallelism a decode step of one batch visits the stages in turn: while stage ``k`` computes, the
others wait, and a token costs the sum of the stages' times. Splitting the batch into ``G`` row groups (``G = PP``
by default) lets stage ``k`` work on group ``g`` while stage ``k + 1`` works on group ``g - 1``, as a pipelined
training schedule does with micro-batches: with ``G >= PP`` every stage is busy in the steady state.

**Schedule.** Every rank runs its items in the order (step ``t``, chunk ``c``, group ``g``); ``t = 0`` is a group's
prefill, every later step decodes one token. Item ``(g, t, c)`` needs the hidden states of ``(g, t)`` from the
chunk before it (a blocking receive) and, at ``c = 0``, the tokens group ``g`` sampled at step ``t - 1`` (the
last stage samples a group after its last chunk and sends them to every stage). Sends are asynchronous, receives
block. The key ``(t, c, g, stage)`` orders all items so that every rank's order and every dependency follow it, so
the smallest unfinished item always has its inputs and the ranks cannot deadlock. Expert-parallel peers (the same
stage of other pipelines) run the same items in the same order, so their MoE exchanges and the per-group
"still running" all-reduce match up.

**Bookkeeping.** Every stage keeps every group's state (live rows, compaction, stops) from the same tokens, as the
one-group loop does, and a group leaves the schedule once no expert-parallel peer has a live row in it (until
then its finished rows step on a dummy row). The last stage draws from the engine's generator in the order
``(t, g)``, so a run with ``G`` groups samples what a one-process run with the same ``G`` samples (the equivalence
tests compare those); ``G = 1`` under PP computes exactly the one-group loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from r1mega.rollout.decode import CachedDecoder, StepInputs
from r1mega.rollout.outputs import Completion, GenerationStats, RowOutputs
from r1mega.rollout.sampling import SamplingParams

TOKENS_TAG = 1
"""Point-to-point tag of the sampled tokens (the hidden states use 0), so the two streams never mix."""


class Engine(Protocol):
    """What the schedule uses of ``engine.RolloutEngine`` (which imports this module, so it is not imported here).
    A batch is the engine's decode state: ``rows`` (each row's prompt index), ``live``, ``tokens``, ``cache``."""

    device: torch.device
    row_groups: int
    stats: GenerationStats
    _pp_group: dist.ProcessGroup | None
    _pp_last: int | None
    _sync_group: dist.ProcessGroup | None

    def _decoder_for(self, max_len: int) -> CachedDecoder: ...
    def _prefill_inputs(
        self, prompts: list[list[int]], max_len: int, rows: list[int]
    ) -> tuple[Any, CachedDecoder, Tensor, StepInputs]: ...
    def _mask_vocab(self, logits: Tensor) -> Tensor: ...
    def _sample(self, logits: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor]: ...
    def _read_host(self, host: Tensor, done: Any = None) -> tuple[list[int], list[float]]: ...
    def _record(self, rows: list[int], sampled: tuple[list[int], list[float]], out: RowOutputs) -> None: ...
    def _any_rank_active(self, active: bool) -> bool: ...
    def _compact(self, batch: Any) -> None: ...
    def _step_inputs(self, batch: Any, t: int, width: int, max_len: int) -> StepInputs: ...
    def _sync(self) -> None: ...
    def _completions(self, prompts: list[list[int]], out: RowOutputs) -> list[Completion]: ...


@dataclass
class _Group:
    """One row group's decode state on this rank."""

    batch: Any
    """The engine's decode state of the group's rows."""
    width: int
    """Slots of the group's (left-padded) prompts."""
    max_len: int
    ids: Tensor
    """The current step's input ids (b, s)."""
    step: StepInputs
    sampled: Tensor | None = None
    """(2, rows) float64 tokens and log-probabilities of the group's last step (on the last stage)."""
    done: bool = False


def split_rows(n: int, groups: int) -> list[range]:
    """``n`` rows in ``min(groups, n)`` contiguous groups of near-equal size (the first ones larger), none empty."""
    groups = min(groups, n)
    base, extra = divmod(n, groups)
    out, start = [], 0
    for g in range(groups):
        size = base + (1 if g < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def generate_pipelined(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
    """Sample one completion per prompt with ``engine.row_groups`` row groups in flight (see the module doc)."""
    t0 = time.perf_counter()
    n = len(prompts)
    parts = split_rows(n, _agree_groups(engine, min(engine.row_groups, n)))
    engine.stats = GenerationStats(n, sum(map(len, prompts)), extra={"cuda_graphs": False, "row_groups": len(parts)})
    decoder = engine._decoder_for(max(map(len, prompts)) + params.max_new_tokens)  # one decoder for every group
    groups = []
    for rows in parts:
        width = max(len(prompts[i]) for i in rows)
        max_len = width + params.max_new_tokens
        batch, _, ids, step = engine._prefill_inputs([prompts[i] for i in rows], max_len, list(rows))
        groups.append(_Group(batch, width, max_len, ids, step))
    out = RowOutputs.of(n, params)
    sends: list[tuple[Any, Tensor]] = []
    others = _other_stages(engine)
    t = 0
    while any(not g.done for g in groups):
        for c in range(len(decoder.chunks)):
            for g in groups:
                if g.done or (c == 0 and t > 0 and not _advance(engine, decoder, g, t - 1, out)):
                    continue
                x = decoder.run_chunk(c, g.ids, g.step, g.batch.cache, sends)
                if x is not None:  # the model's last chunk: sample, and tell every other stage
                    logits = engine._mask_vocab(decoder.logits(x))
                    tokens, logps = engine._sample(logits[: len(g.batch.rows)], params)
                    g.sampled = torch.stack([tokens.to(torch.float64), logps.to(torch.float64)])  # ids < 2**53
                    sends += [
                        (dist.isend(g.sampled, dst, engine._pp_group, tag=TOKENS_TAG), g.sampled) for dst in others
                    ]
        if t == 0:
            engine._sync()
            engine.stats.prefill_s = time.perf_counter() - t0
        sends = [s for s in sends if not s[0].is_completed()]
        t += 1
    for work, _ in sends:
        work.wait()
    engine.stats.steps = t - 1  # the last round only found every group done
    engine.stats.decode_s = time.perf_counter() - t0 - engine.stats.prefill_s
    return engine._completions(prompts, out)


def _advance(engine: Engine, decoder: CachedDecoder, g: _Group, t: int, out: RowOutputs) -> bool:
    """Take group ``g``'s tokens of step ``t`` (sampled here on the last stage, else received from it), record
    them, and set up its next step; False when no expert-parallel peer has a live row left in the group."""
    if decoder.is_last:
        both = g.sampled
    else:
        both = torch.empty(2, len(g.batch.rows), dtype=torch.float64, device=engine.device)
        dist.recv(both, src=engine._pp_last, group=engine._pp_group, tag=TOKENS_TAG)
    tokens = both[0].long()
    engine._record(g.batch.rows, engine._read_host(both.cpu()), out)  # ``both``: (2, rows) float64 already
    g.batch.update_live(out)
    if not engine._any_rank_active(any(g.batch.live)):
        g.done = True
        return False
    g.batch.tokens = tokens
    engine._compact(g.batch)
    g.step = engine._step_inputs(g.batch, t, g.width, g.max_len)
    g.ids = g.batch.tokens[:, None]
    return True


def _agree_groups(engine: Engine, groups: int) -> int:
    """The fewest groups any expert-parallel peer can fill (they must run the same items to match their MoE
    exchanges)."""
    if engine._sync_group is None:
        return groups
    count = torch.tensor([groups], device=engine.device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN, group=engine._sync_group)
    return int(count.item())


def _other_stages(engine: Engine) -> list[int]:
    """Global ranks of the other stages of the last stage's pipeline (those it sends the tokens to)."""
    if engine._pp_group is None:
        return []
    return [r for r in dist.get_process_group_ranks(engine._pp_group) if r != dist.get_rank()]
