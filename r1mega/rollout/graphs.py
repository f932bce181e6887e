"""CUDA graphs of the rollout engine's decode step (one new token per row).

A decode step of a small or mid-sized model is a few hundred short kernels; launched one by one from
Python, the GPU waits on the host. ``GraphedDecoder`` captures the decoder's *static* step (see
``decode``) with ``torch.cuda.CUDAGraph`` and replays it, so a step costs one launch.

What is static: the weights (read in place, so optimizer steps are seen; graphs are recaptured if a
parameter moves to new storage), a persistent KV cache of ``(batch capacity, length capacity)`` that
outlives ``generate`` calls (captured graphs hold its addresses; ``RolloutEngine.release`` frees it),
and device buffers for the inputs: token ids ``(B, 1)``, RoPE positions ``(B, 1)``, the cache slot being written ``(1,)`` and
the additive key bias ``(B, length capacity)`` (0 = visible, -inf = masked) that the engine updates in
place. One graph is captured per (batch bucket, attended-length bucket) on first use and replayed after
the new inputs are copied into the buffers; all graphs share one memory pool (they never run
concurrently). Batch buckets (1, 2, 4, 8, 12, 16, 24, 32, 48, ...) let the engine drop finished rows:
it moves the live rows to the front of the cache in place and switches to the smaller bucket's graph;
finished rows inside a bucket keep running as padding. Length buckets (powers of two from 128, capped
at the capacity) keep early steps from reading the whole cache.

What is refused (the engine decides, see ``graph_refusal``): MoE layers whose experts are sized on the host
(megatron-core's token dispatcher, or the decoder's per-expert loop: fp32 on CUDA, GPUs before Hopper; in
bf16 on Hopper the decoder runs the experts as grouped matmuls over the tokens sorted by expert, which a graph
captures: ``decode.grouped_moe``), tensor parallelism (collectives inside
graphs are not validated here) and devices other than CUDA. A capture that fails, or whose replay
disagrees with the eager run of the same step, turns graphs off for the engine with a logged reason;
decoding continues eagerly on the same cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from torch import Tensor

from r1mega.rollout.decode import CachedDecoder, StepInputs, grouped_moe
from r1mega.rollout.kv_cache import KVCache

MIN_LENGTH_BUCKET = 128
"""Smallest attended-length bucket; buckets double from here up to the cache's length capacity."""


def batch_bucket(n: int) -> int:
    """The captured batch size that holds ``n`` rows: 1, 2, 4, 8, then powers of two and 1.5x powers of two."""
    if n <= 8:
        return 1 << max(n - 1, 0).bit_length()
    power = 1 << (n - 1).bit_length()  # smallest power of two >= n
    return power * 3 // 4 if n <= power * 3 // 4 else power


def length_bucket(keys: int, capacity: int) -> int:
    """Attended cache slots for a step that needs ``keys``: a power of two >= 128, at most ``capacity``."""
    return min(max(MIN_LENGTH_BUCKET, 1 << (keys - 1).bit_length()), capacity)


def length_capacity(max_len: int) -> int:
    """Cache length for a call needing ``max_len`` slots, rounded up so that later calls with slightly longer
    prompts reuse the cache (and its graphs)."""
    return -(-max_len // MIN_LENGTH_BUCKET) * MIN_LENGTH_BUCKET


def graph_refusal(layers: list[torch.nn.Module], device: torch.device, tp: int) -> str | None:
    """Why the decode step of a model with transformer ``layers`` on ``device`` under ``tp`` tensor-parallel
    ranks cannot be captured, or None when it can."""
    if device.type != "cuda":
        return f"the model is on {device}, CUDA graphs need a CUDA device"
    if any(isinstance(layer.mlp, MoELayer) and not grouped_moe(layer.mlp, tp, device) for layer in layers):
        return (
            "the model has MoE layers whose experts are sized on the host every step (grouped expert matmuls "
            "need bf16 on Hopper or later, one process, no expert biases or FP8 experts)"
        )
    if tp > 1:
        return f"tensor parallelism ({tp} ranks): collectives inside captured graphs are not validated"
    return None


def _addresses(model: torch.nn.Module) -> list[int]:
    return [p.data_ptr() for p in model.parameters()]


@contextmanager
def _deterministic_off() -> Iterator[None]:
    """Capture with torch's deterministic mode off: its ``index_copy_`` replacement sorts the indices (a host
    sync). With one distinct slot per step the default kernel is deterministic anyway."""
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


class GraphedDecoder:
    """Captured decode steps of ``decoder`` over a persistent cache of ``batch`` rows and ``length`` slots."""

    def __init__(self, decoder: CachedDecoder, cache: KVCache) -> None:
        self.decoder, self.cache = decoder, cache
        device = cache.tensors()[0].device
        self.batch, self.length = cache.batch, cache.max_len
        self.ids = torch.zeros(self.batch, 1, dtype=torch.long, device=device)  # (B, 1)
        self.positions = torch.zeros(self.batch, 1, dtype=torch.long, device=device)  # (B, 1)
        self.slots = torch.zeros(1, dtype=torch.long, device=device)  # (1,) cache slot of the new token
        self.key_bias = torch.zeros(self.batch, self.length, device=device)  # (B, L) 0 visible, -inf masked
        model = decoder.model
        tied = model.share_embeddings_and_output_weights
        vocab = (model.shared_embedding_or_output_weight() if tied else model.output_layer.weight).shape[0]
        self.logits = torch.zeros(self.batch, vocab, device=device)  # (B, V) fp32 output (tp = 1: whole vocab)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.weights = _addresses(decoder.model)
        self.pool: tuple[int, int] | None = None  # the graphs' shared memory pool, made by the first capture

    def fits(self, batch: int, length: int) -> bool:
        """Whether a call of ``batch`` rows and ``length`` slots fits the cache, with the weights the graphs
        read still at the addresses they were captured with (optimizer steps update them in place)."""
        return batch <= self.batch and length <= self.length and self.weights == _addresses(self.decoder.model)

    def step(self, batch: int, slot: int, tokens: Tensor, positions: Tensor) -> Tensor:
        """Logits (batch, V) of ``tokens`` (batch,) at ``positions`` (batch,), written at cache ``slot``;
        the key bias must already allow ``slot``. The returned view is overwritten by the next step."""
        self.ids[:batch, 0].copy_(tokens)
        self.positions[:batch, 0].copy_(positions)
        self.slots.fill_(slot)
        key = (batch, length_bucket(slot + 1, self.length))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(*key)
        graph.replay()
        return self.logits[:batch]

    def eager_step(self, batch: int, keys: int) -> Tensor:
        """The static step run eagerly on the current buffers (what a graph captures); logits (batch, V)."""
        step = StepInputs(0, self.positions[:batch], self.key_bias[:batch, None, :keys], slots=self.slots)
        logits = self.decoder.step(self.ids[:batch], step, self.cache.narrow(batch))  # (batch, V)
        self.logits[:batch].copy_(logits)
        return self.logits[:batch]

    def _capture(self, batch: int, keys: int) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream, capture, replay once and check the replay against the eager result.

        Warm-up runs execute the step for real; they are idempotent (same inputs, same cache writes)."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with _deterministic_off():
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.eager_step(batch, keys)
            current.wait_stream(side)
            expected = self.logits[:batch].clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.eager_step(batch, keys)
        graph.replay()
        got = self.logits[:batch]
        err = (got - expected).abs().max().item()
        if not err <= 1e-3 * (expected.abs().max().item() + 1.0):  # also catches NaN
            raise RuntimeError(f"the replayed graph's logits differ from the eager step's by {err:.3g}")
        return graph
