"""The rollout engine: batched, KV-cached sampling from an r1mega model for GRPO, rejection sampling,
distillation and evaluation.

Prompts of different lengths share one batch, left-padded so that every row writes the same cache slot
each step (RoPE positions stay per row). Rows that finish (end-of-sequence, a stop token or string, the
length limit) stop costing compute: once a quarter of the rows are done the batch and its cache are
compacted to the live rows.

Devices: the cache, ids, masks and the sampler's generator live on the model's device; prompts are
built on the host and copied once, and each decode step moves its sampled tokens and log-probabilities
to the host in one transfer, where the stop checks and the per-row bookkeeping (which rows are live,
which prompt a cache row belongs to) run as plain Python. On CUDA, dense models (and MoE models whose
experts run as grouped matmuls: bf16 on Hopper, one process) replay the decode step as a CUDA graph
(``graphs``; ``cuda_graphs`` chooses, auto by default), with batch buckets instead of exact compaction,
one step ahead of the host (``_decode_ahead``); everything else runs the step eagerly.

``max_batch`` (continuous batching), per-sequence ``seeds`` and ``speculative`` (MTP drafts verified by the
main model) switch to the per-row loop of ``scheduler``; without them the loop below runs, unchanged.

Parallelism: every tensor-parallel rank runs the same prompts and gets the same tokens (sampled from the
gathered logits, then broadcast from the group's first rank). Under expert parallelism each rank brings its
own prompts (it is a data-parallel rank), and ranks keep stepping, on a dummy row once their own work is
done, until every rank has finished, because MoE layers exchange tokens in every step.

Pipeline parallelism (and virtual stages) decodes in the training layout: each rank's decoder runs only its
chunks' layers against a cache of those layers (the MLA latent cache stays), hidden states go stage to
stage over the pipeline group, the last stage samples, and the tokens and log-probabilities are sent to
the whole pipeline group, so every rank keeps the same bookkeeping (which rows live, when to stop). The
batch is split into ``row_groups`` groups (one per stage by default) that are in flight at once, so stages
work on different groups instead of waiting for each other (``pipelined``). The sampler's generator is drawn
from on the last stage only and its state is broadcast back after each call, so every stage holds (and
checkpoints) the same generator. The per-row loop (continuous batching, per-sequence seeds, speculative
decoding) and CUDA graphs run without pipeline parallelism.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection

from r1mega.models.builder import unwrap
from r1mega.rollout.decode import CachedDecoder, StepInputs, rollout_groups
from r1mega.rollout.graphs import GraphedDecoder, batch_bucket, graph_refusal, length_capacity
from r1mega.rollout.kv_cache import KVCache
from r1mega.rollout.outputs import Completion, GenerationStats, RowOutputs, completion_text, finish_reason
from r1mega.rollout.pipelined import generate_pipelined
from r1mega.rollout.sampling import SamplingParams, sample_tokens
from r1mega.rollout.scheduler import generate_rows
from r1mega.utils.logging import get_logger

log = get_logger(__name__)


@contextmanager
def _eval_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, was_training, strict=True):
            m.train(mode)


@dataclass
class _Batch:
    """The decode loop's state: tensors fed to the model on its device, bookkeeping on the host."""

    cache: KVCache
    key_bias: torch.Tensor
    """(size, max_len) additive bias per cache row and slot: 0 visible, -inf masked."""
    lens: torch.Tensor
    """(size,) prompt length per cache row (0 for padding rows)."""
    tokens: torch.Tensor
    """(size,) last sampled token per cache row."""
    rows: list[int]
    """Prompt index of each real cache row (the first ``len(rows)`` rows; the rest are graph padding)."""
    live: list[bool]
    """Per real row: still generating."""
    graphed: GraphedDecoder | None = None
    """The persistent graph cache these tensors view, or None for a per-call eager cache."""

    @property
    def size(self) -> int:
        """Cache rows the model runs (real rows plus graph padding)."""
        return self.key_bias.shape[0]

    def update_live(self, out: RowOutputs) -> None:
        """``live`` from the outputs recorded so far: a row is live while its prompt's completion runs."""
        self.live = [out.reasons[r] is None for r in self.rows]


class RolloutEngine:
    """Samples completions from the model chunks a trainer holds (weights shared, never copied).

    ``cuda_graphs``: replay the decode step as CUDA graphs (True), never (False), or when the model allows
    it (None: on CUDA without tensor parallelism, a dense model or MoE experts that run grouped; see
    ``graphs.graph_refusal``). Graphs keep a KV cache on the device between calls; ``release`` frees it. ``groups``: the process groups of a model
    split by tensor or expert parallelism (``ParallelContext.groups``); None for a model on one process.

    ``max_batch``: continuous batching, at most this many rows decode at once and finished rows are replaced
    by waiting prompts (None: every prompt of a call in one batch). ``speculative``: the model's MTP module
    drafts a token that the main model verifies in the next step's forward (exact sampling distribution; one
    process, a model with ``mtp_num_layers``). Either one, or ``seeds`` given to ``generate``, runs the
    per-row loop (``scheduler``), where every sequence draws from its own seed; it never uses CUDA graphs.

    ``compiled``: one-token decode steps compiled by ``torch.compile`` (CPU, the model whole on this process;
    ``CachedDecoder``): the same tokens and log-probabilities as eager steps up to fp32 rounding, faster once
    compiled (the first call compiles).

    ``row_groups``: the batch is split into this many groups of rows that are in flight in the pipeline at
    once (``pipelined``); None: one per pipeline stage (1 without pipeline parallelism). More than one group
    without pipeline parallelism decodes the groups in turn (what a pipelined run is compared against).
    """

    def __init__(
        self,
        chunks: Sequence[torch.nn.Module],
        tokenizer: Any = None,
        eos_token_ids: Sequence[int] = (),
        vocab_size: int | None = None,
        seed: int = 0,
        pad_token_id: int = 0,
        cuda_graphs: bool | None = None,
        groups: ProcessGroupCollection | None = None,
        max_batch: int | None = None,
        speculative: bool = False,
        row_groups: int | None = None,
        compiled: bool = False,
    ) -> None:
        self.chunks: list[GPTModel] = [unwrap(c) for c in chunks]
        """This rank's model chunks (several with virtual pipeline stages)."""
        self.model: GPTModel = self.chunks[0]
        self.device = next(self.model.parameters()).device
        self.tokenizer = tokenizer
        eos = list(eos_token_ids)
        if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = [tokenizer.eos_token_id]
        self.eos_token_ids = tuple(eos)
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.stats = GenerationStats()
        self._decoder: CachedDecoder | None = None
        self._graphed: GraphedDecoder | None = None
        self._tp_group, self._sync_group, self._pp_group = rollout_groups(self.model.config, groups)
        self._tp = torch.distributed.get_world_size(self._tp_group) if self._tp_group is not None else 1
        if len(self.chunks) > 1 and self._pp_group is None:
            raise ValueError("several model chunks on a rank are virtual pipeline stages: build them with PP > 1")
        self._pp_last = (
            torch.distributed.get_global_rank(self._pp_group, torch.distributed.get_world_size(self._pp_group) - 1)
            if self._pp_group is not None
            else None
        )
        """Global rank of this pipeline's last stage (which samples), or None without pipeline parallelism."""
        if self._pp_group is not None and (max_batch is not None or speculative):
            raise ValueError(
                "continuous batching (max_batch) and speculative decoding run without pipeline parallelism: "
                "leave them off (grpo.rollout_batch=null, grpo.speculative=false) with PP > 1"
            )
        self.cuda_graphs = self._choose_graphs(cuda_graphs)
        self.compiled = compiled
        if compiled:
            self._check_compiled()
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be a positive number of rows (or None for no limit)")
        self.max_batch, self.speculative = max_batch, speculative
        if row_groups is not None and row_groups < 1:
            raise ValueError(f"row_groups={row_groups} must be a positive number of groups (or None: one per stage)")
        pp = torch.distributed.get_world_size(self._pp_group) if self._pp_group is not None else 1
        self.row_groups = row_groups or pp
        """Row groups in flight (``pipelined``)."""
        if speculative:
            self._check_speculative()

    def _check_speculative(self) -> None:
        if not self._decoder_for(1).has_mtp:
            raise ValueError(
                "speculative decoding drafts with the model's MTP module: use a model with mtp_num_layers >= 1"
            )
        if self._tp > 1 or self._sync_group is not None or self._pp_group is not None:
            raise ValueError("speculative decoding runs on one process: use it with TP=1, EP=1 and PP=1")

    def _check_compiled(self) -> None:
        if self.device.type != "cpu":
            raise ValueError(
                f"compiled decode steps are for models on the CPU (this one is on {self.device}): on CUDA the "
                "decode step is replayed as CUDA graphs (cuda_graphs); leave rollout compilation off"
            )
        if self._tp > 1 or self._sync_group is not None or self._pp_group is not None:
            raise ValueError(
                "compiled decode steps run a model that is whole on one process: leave rollout compilation off "
                "with TP, EP or PP > 1"
            )

    def _choose_graphs(self, wanted: bool | None) -> bool:
        if wanted is False:
            return False
        refusal = graph_refusal(list(self.model.decoder.layers), self.device, self._tp)
        if self._pp_group is not None:
            refusal = "pipeline parallelism (each decode step exchanges hidden states between stages)"
        if refusal is not None and wanted:
            raise ValueError(f"cuda_graphs=True cannot be honoured: {refusal}; pass cuda_graphs=None or False")
        if refusal is not None:
            if self.device.type == "cuda":
                log.info("rollout: eager decode steps (no CUDA graphs: %s)", refusal)
            return False
        log.info("rollout: decode steps replayed as CUDA graphs (dense model on %s)", self.device)
        return True

    def release(self) -> None:
        """Free the persistent KV cache and captured graphs of the CUDA-graph path (rebuilt on the next call)."""
        self._graphed = None

    # ---- state (for checkpointing the sampler) -----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The sampler's random state."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the sampler's random state."""
        self.generator.set_state(state["generator"])

    # ---- public API -----------------------------------------------------------------------------------

    def encode(self, prompts: Sequence[str], prefix: str = "") -> list[list[int]]:
        """Token ids of text prompts, each followed by ``prefix`` (R1: ``"<think>\\n"``)."""
        if self.tokenizer is None:
            raise ValueError("encode() needs the engine to be built with a tokenizer")
        return [self.tokenizer.encode(p + prefix, add_special_tokens=False) for p in prompts]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        """Sample one completion per prompt (token-id lists, chat template and prefix already applied).

        ``seeds``: one per prompt (in [0, 2**62)) for the per-row loop, where a sequence's tokens depend only
        on its prompt and seed; without them that loop draws them from the engine's generator."""
        params = params or SamplingParams()
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine to be built with a tokenizer")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
        if seeds is not None and self._pp_group is not None:
            raise ValueError("per-sequence seeds run the per-row loop, which needs PP=1: leave seeds out with PP > 1")
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        with _eval_mode(self.chunks):
            if self._decoder is not None:
                self._decoder.refresh_weights()  # the trainer may have updated the experts since the last call
            if seeds is None and self.max_batch is None and not self.speculative:
                if self._pp_group is None and self.row_groups == 1:
                    return self._generate([list(p) for p in prompts], params)
                out = generate_pipelined(self, [list(p) for p in prompts], params)
                self._share_generator()
                return out
            return generate_rows(self, [list(p) for p in prompts], params, seeds)

    # ---- internals ------------------------------------------------------------------------------------

    def _decoder_for(self, max_len: int) -> CachedDecoder:
        decoder = self._decoder
        if decoder is not None and decoder.compiled and decoder.max_len < max_len:
            decoder.grow(max(max_len, 2 * decoder.max_len))  # the compiled step stays valid (no CUDA graphs here)
        elif decoder is None or decoder.max_len < max_len:
            self._decoder = CachedDecoder(
                self.chunks, max(max_len, 256), self._tp_group, self._pp_group, compiled=self.compiled
            )
        return self._decoder

    def _graphed_for(self, batch: int, max_len: int) -> GraphedDecoder:
        """The persistent graph cache, grown (and its graphs dropped) when ``batch`` rows of ``max_len`` slots
        do not fit."""
        old = self._graphed
        if old is None or not old.fits(batch, max_len):
            self._graphed = None  # free the old cache and graphs before allocating the new ones
            rows, length = max(batch, old.batch if old else 0), max(length_capacity(max_len), old.length if old else 0)
            decoder = self._decoder_for(length)
            dtype = next(self.model.parameters()).dtype
            cache = KVCache(self.model.config, len(decoder.layers), rows, length, dtype, self.device, tp=decoder.tp)
            self._graphed = GraphedDecoder(decoder, cache)
        return self._graphed

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host-built tensor on the model's device (pinned, asynchronous copy on CUDA)."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _to_host(self, tokens: torch.Tensor, logps: torch.Tensor) -> tuple[list[int], list[float]]:
        """Sampled tokens and log-probabilities as Python lists: one device-to-host transfer for both."""
        return self._read_host(*self._send_host(tokens, logps))

    def _send_host(self, tokens: torch.Tensor, logps: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start moving ``tokens`` and ``logps`` (rows,) to the host in one transfer: on CUDA a copy into pinned
        memory queued behind the work that computes them, and the event that marks its end (``_read_host``)."""
        both = torch.stack([tokens.to(torch.float64), logps.to(torch.float64)])  # (2, rows); ids < 2**53
        if both.device.type != "cuda":
            return both, None
        host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
        host.copy_(both, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    @staticmethod
    def _read_host(host: torch.Tensor, done: Any = None) -> tuple[list[int], list[float]]:
        """The lists of (2, rows) tokens and log-probabilities on the host: a ``_send_host`` transfer once it has
        arrived (``done``, its event; work queued after it may still run)."""
        if done is not None:
            done.synchronize()
        return [int(x) for x in host[0].tolist()], host[1].tolist()

    def _mask_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab_size is not None and self.vocab_size < logits.shape[-1]:
            logits[:, self.vocab_size :] = float("-inf")  # padded vocabulary entries are never sampled
        return logits

    def _logits(self, decoder: CachedDecoder, ids: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        """Masked logits of the whole model on this rank (without PP: ``pipelined`` runs the stages' chunks)."""
        logits = decoder.step(ids, step, cache)
        assert logits is not None, "a pipeline stage decodes through rollout.pipelined"
        return self._mask_vocab(logits)

    def _sample(
        self, logits: torch.Tensor, params: SamplingParams, sync_free: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and log-probabilities (rows,) of ``logits`` (rows, V); tensor-parallel ranks take their group's
        first rank's (they sample the same logits, but must not depend on their generators agreeing).
        ``sync_free``: a sampler that never waits for the device (``sample_tokens``)."""
        tokens, logps = sample_tokens(logits, params, self.generator, sync_free=sync_free)
        if self._tp_group is not None:
            src = torch.distributed.get_global_rank(self._tp_group, 0)
            torch.distributed.broadcast(tokens, src=src, group=self._tp_group)
            torch.distributed.broadcast(logps, src=src, group=self._tp_group)
        return tokens, logps

    def _share_generator(self) -> None:
        """Under pipeline parallelism: every stage takes the last stage's generator state (it drew the samples)."""
        if self._pp_group is None:
            return
        state = self.generator.get_state().to(self.device)
        torch.distributed.broadcast(state, src=self._pp_last, group=self._pp_group)
        self.generator.set_state(state.cpu())

    def _any_rank_active(self, active: bool) -> bool:
        if self._sync_group is None:
            return active
        flag = torch.tensor([int(active)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._sync_group)
        return bool(flag.item())

    def _graph_step(self, batch: _Batch, slot: int, positions: torch.Tensor) -> torch.Tensor | None:
        """Logits from the captured step, or None (graphs now off, with the reason logged) when capture fails."""
        try:
            return self._mask_vocab(batch.graphed.step(batch.size, slot, batch.tokens, positions))
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to the eager step
            log.warning(
                "rollout: CUDA graph capture failed for batch %d (%s: %s); decoding eagerly from now on",
                batch.size, type(exc).__name__, exc,
            )  # fmt: skip
            self.cuda_graphs = False
            batch.graphed.graphs.clear()
            try:
                self._sync()  # surface a failed capture's asynchronous error here, not in the next kernel
            except RuntimeError as sticky:
                log.warning("rollout: the device reported %s after the failed capture", sticky)
            return None

    def _stopped(self, row_tokens: list[int], params: SamplingParams) -> str | None:
        return finish_reason(row_tokens, params, self.eos_token_ids, self.tokenizer)

    def _text(self, tokens: list[int], reason: str, params: SamplingParams) -> str:
        return completion_text(tokens, reason, params, self.eos_token_ids, self.tokenizer)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prefill(self, prompts: list[list[int]], max_len: int) -> tuple[_Batch, CachedDecoder, torch.Tensor]:
        """Left-pad the prompts into one batch, fill the cache; the batch state, the decoder and the logits
        (n, V) of each prompt's last token."""
        graphed = self._graphed_for(batch_bucket(len(prompts)), max_len) if self.cuda_graphs else None
        self.stats = GenerationStats(
            len(prompts), sum(map(len, prompts)), extra={"cuda_graphs": graphed is not None}
        )  # fmt: skip
        batch, decoder, ids, step = self._prefill_inputs(prompts, max_len, list(range(len(prompts))), graphed)
        logits = self._logits(decoder, ids, step, batch.cache.narrow(len(prompts)))
        return batch, decoder, logits

    def _prefill_inputs(
        self, prompts: list[list[int]], max_len: int, rows: list[int], graphed: GraphedDecoder | None = None
    ) -> tuple[_Batch, CachedDecoder, torch.Tensor, StepInputs]:
        """The batch state of ``prompts`` (left-padded into one batch; ``rows``: their indices in the call), the
        decoder, and the prefill's ids (n, width) and step inputs; the cache's size is added to ``stats``."""
        n, width = len(prompts), max(len(p) for p in prompts)
        if graphed is not None:
            size, decoder = batch_bucket(n), graphed.decoder
            cache, key_bias = graphed.cache.narrow(size), graphed.key_bias[:size]
        else:
            size, decoder = n, self._decoder_for(max_len)
            dtype = next(self.model.parameters()).dtype
            cache = KVCache(self.model.config, len(decoder.layers), n, max_len, dtype, self.device, tp=decoder.tp)
            key_bias = torch.empty(n, max_len, device=self.device)
        allocated = graphed.cache if graphed is not None else cache
        self.stats.cache_bytes += allocated.nbytes
        self.stats.cache_bytes_per_token = allocated.bytes_per_token()

        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)  # built on the host, copied once
        lens = torch.zeros(size, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            lens[i] = len(p)
        ids, lens = self._to_device(ids), self._to_device(lens)
        slots = torch.arange(width, device=self.device)
        pad = width - lens[:n]  # (n,) left padding
        positions = (slots[None] - pad[:, None]).clamp(min=0)  # (n, width)
        valid = slots[None] >= pad[:, None]  # (n, width) prompt tokens, not padding
        key_bias.fill_(0.0)  # padding rows of a graph batch see every slot: finite values, never read
        key_bias[:n].fill_(float("-inf"))
        key_bias[:n, :width].masked_fill_(valid, 0.0)
        causal = slots[None, :] <= slots[:, None]  # (width, width)
        eye = torch.eye(width, dtype=torch.bool, device=self.device)
        allowed = (causal[None] & valid[:, None, :]) | eye[None]  # (n, width, width)
        bias = torch.zeros(n, width, width, device=self.device).masked_fill(~allowed, float("-inf"))
        empty = torch.empty(0, dtype=torch.long, device=self.device)
        batch = _Batch(cache, key_bias, lens, empty, list(rows), [True] * n, graphed)
        return batch, decoder, ids, StepInputs(0, positions, bias)

    def _compact(self, batch: _Batch) -> None:
        """Drop finished rows: eagerly once a quarter of the rows are done (keeping one dummy row if none is
        live); under graphs when the live rows fit a smaller batch bucket (moved to the front in place)."""
        live = sum(batch.live)
        if batch.graphed is None:
            if live > 0.75 * len(batch.rows):
                return
            keep = [r for r, x in enumerate(batch.live) if x] or [0]
            idx = torch.tensor(keep, device=self.device)
            batch.cache.compact(idx)
            batch.key_bias, batch.lens, batch.tokens = batch.key_bias[idx], batch.lens[idx], batch.tokens[idx]
        else:
            size = batch_bucket(live)
            if live == 0 or size >= batch.size:
                return
            keep = [r for r, x in enumerate(batch.live) if x]
            idx = self._to_device(torch.tensor(keep))
            g = batch.graphed
            g.cache.compact_(idx)
            g.key_bias[:live] = g.key_bias.index_select(0, idx)
            g.key_bias[live:size] = 0.0
            batch.cache, batch.key_bias = g.cache.narrow(size), g.key_bias[:size]
            batch.lens = F.pad(batch.lens.index_select(0, idx), (0, size - live))
            batch.tokens = F.pad(batch.tokens.index_select(0, idx), (0, size - live), value=self.pad_token_id)
        batch.rows = [batch.rows[r] for r in keep]
        batch.live = [batch.live[r] for r in keep]

    def _step(self, batch: _Batch, decoder: CachedDecoder, t: int, width: int, max_len: int) -> torch.Tensor:
        """Logits (size, V) of decode step ``t``: the captured graph when on, else the eager sliced step."""
        step = self._step_inputs(batch, t, width, max_len)
        if batch.graphed is not None and self.cuda_graphs:
            logits = self._graph_step(batch, step.start, step.positions[:, 0])
            if logits is not None:
                return logits
        return self._logits(decoder, batch.tokens[:, None], step, batch.cache)

    def _step_inputs(self, batch: _Batch, t: int, width: int, max_len: int) -> StepInputs:
        """The eager sliced step's inputs for decode step ``t`` (the batch's last sampled tokens at slot
        ``width + t``), the slot made visible to every row."""
        # A rank with no live rows only serves other ranks' MoE exchanges; its dummy row reuses the last slot.
        slot = min(width + t, max_len - 1)
        batch.key_bias[:, slot] = 0.0
        positions = (batch.lens + t).clamp(max=max_len - 1)  # (size,) position of the new token
        return StepInputs(slot, positions[:, None], batch.key_bias[:, None, : slot + 1])

    def _record(self, rows: list[int], sampled: tuple[list[int], list[float]], out: RowOutputs) -> None:
        """Append a step's sampled tokens and log-probabilities (host lists, one per cache row; ``rows``: the
        prompt of each row when they were sampled) to the outputs of the prompts still running; a prompt whose
        completion ends here (a stop, or the length limit) gets its reason and takes no more tokens."""
        for orig, tok, lp in zip(rows, *sampled, strict=False):  # graph padding rows beyond ``rows`` are skipped
            if out.reasons[orig] is not None:
                continue
            out.tokens[orig].append(tok)
            out.logps[orig].append(lp)
            reason = self._stopped(out.tokens[orig], out.params)
            if reason is None and len(out.tokens[orig]) == out.params.max_new_tokens:
                reason = "length"
            out.reasons[orig] = reason

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """The whole batch as one group on one pipeline stage (see ``pipelined`` for PP and row groups)."""
        t0 = time.perf_counter()
        width = max(len(p) for p in prompts)
        max_len = width + params.max_new_tokens
        batch, decoder, logits = self._prefill(prompts, max_len)
        self._sync()
        self.stats.prefill_s = time.perf_counter() - t0

        out = RowOutputs.of(len(prompts), params)
        if batch.graphed is not None:
            self._decode_ahead(batch, decoder, logits, width, max_len, out)
        else:
            for t in itertools.count():
                tokens, logps = self._sample(logits[: len(batch.rows)], params)  # (real rows,) on the device
                self._record(batch.rows, self._to_host(tokens, logps), out)
                batch.update_live(out)
                self.stats.steps = t + 1
                if not self._any_rank_active(any(batch.live)):
                    break
                batch.tokens = tokens
                self._compact(batch)
                logits = self._step(batch, decoder, t, width, max_len)

        self.stats.decode_s = time.perf_counter() - t0 - self.stats.prefill_s
        if batch.graphed is not None:
            self.stats.extra["graphs_captured"] = len(batch.graphed.graphs)
        if not self.cuda_graphs:
            self._graphed = None  # capture failed: free the graph cache
        return self._completions(prompts, out)

    def _decode_ahead(
        self, batch: _Batch, decoder: CachedDecoder, logits: torch.Tensor, width: int, max_len: int, out: RowOutputs
    ) -> None:
        """The graph layout's decode loop, one step ahead of the host (``logits``: the prefill's).

        Step t's forward is queued on the device before the host reads the tokens it consumes (step t's
        samples): the device's copy of them feeds the forward, and their transfer to the host, queued before
        the forward, lets the host record them, check stops and queue the next sampling while the device runs
        the forward. The device waits on the host only when the host's work per step outlasts a step. What a
        step ahead costs: a row that ends at step t is run once more (step t's forward, step t+1's draw) before
        the host knows it ended; its extra token is never recorded, and it is dropped from the batch a step
        later than in the eager loop (so sampled tokens, which depend on the rows drawn, differ from the eager
        layout's, as they already did with padded buckets). The sampler makes no host round trip
        (``sync_free``), or the host would wait for every forward before queuing the next."""
        params = out.params
        tokens, logps = self._sample(logits[: len(batch.rows)], params, sync_free=True)  # step 0's tokens
        sent, rows = self._send_host(tokens, logps), list(batch.rows)
        batch.tokens = self._padded(batch, tokens)
        for t in itertools.count():
            last = t + 1 >= params.max_new_tokens  # every row ends with step t's token
            if not last:
                logits = self._step(batch, decoder, t, width, max_len)  # queued: reads step t's tokens on the device
            self._record(rows, self._read_host(*sent), out)  # step t's tokens, while the device runs the forward
            self.stats.steps = t + 1
            batch.update_live(out)
            if last or not any(batch.live):
                return
            tokens, logps = self._sample(logits[: len(batch.rows)], params, sync_free=True)  # step t + 1
            sent, rows = self._send_host(tokens, logps), list(batch.rows)
            batch.tokens = self._padded(batch, tokens)
            self._compact(batch)  # drops the rows that ended at step t (their step t + 1 tokens with them)

    def _padded(self, batch: _Batch, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (real rows,) padded to the batch's rows (a graph bucket has rows beyond the real ones)."""
        if tokens.shape[0] < batch.size:
            tokens = F.pad(tokens, (0, batch.size - tokens.shape[0]), value=self.pad_token_id)
        return tokens

    def _completions(self, prompts: list[list[int]], out: RowOutputs) -> list[Completion]:
        self.stats.generated_tokens = sum(map(len, out.tokens))
        return [
            Completion(p, toks, lps, self._text(toks, reason or "length", out.params), reason or "length")
            for p, toks, lps, reason in zip(prompts, out.tokens, out.logps, out.reasons, strict=True)
        ]
