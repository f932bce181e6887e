"""Floors for a decode step, used by ``rollout_throughput.py``.

- **Matmul floor**: a decode step that does only the weights' matrix products, at the shapes one step of
  ``batch`` rows runs them (no attention, no norms, no sampling, no bookkeeping): every weight matrix of the
  main model times ``(tokens, in_features)`` activations, where ``tokens`` is ``batch`` for dense weights and
  ``batch * top_k / num_experts`` (the mean a routed expert sees) for routed experts. MLA's key/value
  up-projection counts once (the absorbed form multiplies by it per head, the same FLOPs). The MTP module and
  the embedding lookup are not matmuls of a plain decode step. ``floor tokens/s = batch / seconds per step``.
- **Attention floor**: the attention's own matrix products in one decode step, against a cache allocated as the
  engine's (one tensor per layer, so the step reads it from memory): per layer the scores (queries times the
  cached keys) and the context (probabilities times the cached values) of every row at one attended length, and
  nothing else (no softmax, no scaling, no cache writes). Their cost grows with the attended length and at
  decode shapes is the read of the cache: work the matmul floor leaves out. Timed at two lengths and
  interpolated (``at``) to the mean length the generated tokens attended.
- **Step floor**: the products of both floors above in the order a step runs them (each layer's weights with
  its attention's products between them). Reading the cache between the weights leaves fewer of them in the
  processor's caches, so this is slower than the two timed apart.
- **Work floor**: the floors of everything a side computes for its tokens, prefill included: the step floor's
  time for each generated token, plus the prompts' prefill matmuls (every weight times the prompt tokens of
  ``batch`` prompts at once, the output layer times their last positions only, as a prefill computes logits
  there). Every response costs a prefill that yields one token, so with short responses the decode floor alone
  leaves out a large part of the work every side has to do.
- **Bandwidth floor** (GPU): a step reads every weight once plus each row's KV cache up to its position, at the
  bandwidth of a large device-to-device copy measured in the same run.
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def decode_matmuls(model: torch.nn.Module, batch: int, head_rows: int | None = None) -> list[tuple[int, Tensor]]:
    """(tokens, weight) for every weight matrix product of one decode step of ``batch`` rows; with ``head_rows``,
    of a prefill of ``batch`` prompt tokens whose logits are computed at ``head_rows`` positions."""
    return [(n, w) for _, n, w in named_decode_matmuls(model, batch, head_rows)]


def named_decode_matmuls(
    model: torch.nn.Module, batch: int, head_rows: int | None = None
) -> list[tuple[str, int, Tensor]]:
    """``decode_matmuls`` with each weight's parameter name, in the model's order."""
    config = model.config
    experts, top_k = config.num_moe_experts or 1, config.moe_router_topk
    routed = max(round(batch * top_k / experts), 1)
    head = batch if head_rows is None else head_rows
    out: list[tuple[str, int, Tensor]] = []
    for name, p in model.named_parameters():
        if p.dim() != 2 or name.startswith("mtp."):
            continue
        if name == "embedding.word_embeddings.weight":  # a lookup; a matmul only as the tied output layer
            if model.share_embeddings_and_output_weights:
                out.append((name, head, p))
            continue
        if name == "output_layer.weight":
            out.append((name, head, p))
            continue
        if name.endswith((".experts.weight1", ".experts.weight2")):  # grouped experts: one matrix per expert
            stacked = model.get_submodule(name.rsplit(".", 1)[0]).stacked_weights()[name.endswith("weight2")]
            out.extend((f"{name}.{e}", routed, w.t()) for e, w in enumerate(stacked))  # (out, in) each
            continue
        out.append((name, routed if ".local_experts." in name else batch, p))
    return out


def routed_weight(name: str) -> bool:
    """Whether ``named_decode_matmuls``' product ``name`` is a routed expert's (it sees its share of the rows)."""
    return ".local_experts." in name or re.search(r"\.experts\.weight[12]\.\d+$", name) is not None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MatmulFloor:
    """Times the matmul floor of ``model`` at ``batch`` rows; ``time()`` is one measurement (the benchmark
    interleaves it with the sides it compares, so load changes on a shared machine hit all of them)."""

    def __init__(
        self,
        model: torch.nn.Module,
        batch: int,
        steps: int = 16,
        clock: Any = time.perf_counter,
        head_rows: int | None = None,
    ) -> None:
        self.batch, self.steps, self.clock = batch, steps, clock
        gen = torch.Generator().manual_seed(0)
        named = named_decode_matmuls(model, batch, head_rows)
        matmuls = [(n, w) for _, n, w in named]
        inputs: dict[tuple[int, int], Tensor] = {}  # one activation per shape (a prefill's are large)
        for n, w in matmuls:
            if (n, w.shape[1]) not in inputs:
                inputs[n, w.shape[1]] = torch.randn(n, w.shape[1], generator=gen).to(w.device, w.dtype)
        self.pairs = [(inputs[n, w.shape[1]], w.detach()) for n, w in matmuls]
        self.names = [name for name, _, _ in named]
        """Each product's weight, by parameter name."""
        self.device = self.pairs[0][1].device
        self.flops = sum(2 * n * w.numel() for n, w in matmuls)
        """FLOPs of one floor step."""
        self.seconds: list[float] = []
        self._run(2)  # warm-up

    def _run(self, steps: int) -> None:
        with torch.no_grad():
            for _ in range(steps):
                for x, w in self.pairs:
                    F.linear(x, w)

    def time(self) -> float:
        """Seconds per floor step, measured over ``steps`` steps; also recorded in ``seconds``."""
        _sync(self.device)
        t0 = self.clock()
        self._run(self.steps)
        _sync(self.device)
        self.seconds.append((self.clock() - t0) / self.steps)
        return self.seconds[-1]

    @property
    def tok_s(self) -> float:
        """Floor tokens/s: ``batch`` tokens per step at the median measured step time."""
        return self.batch / statistics.median(self.seconds)


class PrefillFloor:
    """Times the prefill matmuls of ``prompt_lengths``, ``batch`` prompts at a time (``decode_matmuls`` with
    their token count, the output layer at their last positions); ``time()`` is one measurement of all of them."""

    def __init__(
        self, model: torch.nn.Module, prompt_lengths: list[int], batch: int, clock: Any = time.perf_counter
    ) -> None:
        chunks = [prompt_lengths[i : i + batch] for i in range(0, len(prompt_lengths), batch)]
        self.floors = [MatmulFloor(model, sum(c), steps=1, clock=clock, head_rows=len(c)) for c in chunks]
        self.seconds: list[float] = []

    def time(self) -> float:
        self.seconds.append(sum(f.time() for f in self.floors))
        return self.seconds[-1]

    @property
    def median(self) -> float:
        """Seconds for every prompt's prefill matmuls, the median measurement."""
        return statistics.median(self.seconds)


class _PerLength:
    """A floor timed at two attended lengths: ``products[length]`` is every (activation, operand) product of one
    step at that length; ``at(length)`` interpolates the median times linearly between the two (the attention's
    work is linear in the length)."""

    lengths: tuple[int, int]
    products: dict[int, list[tuple[Tensor, Tensor]]]
    steps: int
    clock: Any

    def _start(self) -> None:
        self.seconds: dict[int, list[float]] = {n: [] for n in self.lengths}
        for n in self.lengths:
            self._run(n, 2)  # warm-up

    def _run(self, n: int, steps: int) -> None:
        with torch.no_grad():
            for _ in range(steps):
                for a, b in self.products[n]:
                    if a.dim() == 2 and b.dim() == 2:
                        F.linear(a, b)  # a weight: (tokens, in) x (out, in)^T
                    else:
                        torch.matmul(a, b)  # the attention's, batched over rows (and groups)

    def time(self) -> None:
        """One measurement at each of the two lengths (``steps`` steps each)."""
        for n in self.lengths:
            device = self.products[n][0][0].device
            _sync(device)
            t0 = self.clock()
            self._run(n, self.steps)
            _sync(device)
            self.seconds[n].append((self.clock() - t0) / self.steps)

    def at(self, length: float) -> float:
        """Seconds per step at a mean attended ``length``: the median times, interpolated linearly (and
        extrapolated past the two lengths)."""
        (a, b), (ta, tb) = self.lengths, (statistics.median(self.seconds[n]) for n in self.lengths)
        return max(ta + (tb - ta) * (length - a) / (b - a), 0.0)


class AttentionFloor(_PerLength):
    """Times the attention matmuls of one decode step of ``batch`` rows (see the module docstring) at two attended
    lengths, ``short`` and ``long``. Shapes as the engine's decoder runs them: grouped-query attention
    ``(b, groups, heads/groups, d) x (b, groups, d, S)`` then ``(b, groups, heads/groups, S) x (b, groups, S, d)``;
    absorbed MLA ``(b, heads, r + dr) x (b, r + dr, S)`` then ``(b, heads, S) x (b, S, r)`` on the latent cache."""

    def __init__(
        self,
        model: torch.nn.Module,
        batch: int,
        short: int,
        long: int,
        steps: int = 16,
        clock: Any = time.perf_counter,
    ) -> None:
        from r1mega.rollout.kv_cache import KVCache

        if not 0 < short < long:
            raise ValueError(f"attended lengths must satisfy 0 < short < long, got {short}, {long}")
        config, param = model.config, next(model.parameters())
        self.batch, self.lengths, self.steps, self.clock = batch, (short, long), steps, clock
        self.layers = config.num_layers
        cache = KVCache(config, self.layers, batch, long, param.dtype, param.device)
        gen = torch.Generator().manual_seed(0)
        for t in cache.tensors():
            t.copy_(torch.randn(t.shape, generator=gen))
        heads = config.num_attention_heads

        def rand(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen).to(param.device, param.dtype)

        self.products = {}
        for n in self.lengths:
            products = []
            if cache.layout.latent:
                r = config.kv_lora_rank
                q, p = rand(batch, heads, cache.layout.values_per_token), rand(batch, heads, n)
                for latent in cache.latent:
                    products += [(q, latent[:, :n].transpose(1, 2)), (p, latent[:, :n, :r])]
            else:
                groups = config.num_query_groups
                q, p = rand(batch, groups, heads // groups, config.kv_channels), rand(batch, groups, heads // groups, n)
                for k, v in zip(cache.keys, cache.values, strict=True):
                    products += [(q, k[:, :, :n].transpose(-1, -2)), (p, v[:, :, :n])]
            self.products[n] = products
        self.bytes_per_position = batch * cache.layout.values_per_token * param.element_size() * self.layers
        """Cache bytes one step reads per attended position (every row and layer)."""
        self._start()


class StepFloor(_PerLength):
    """Times one decode step's matrix products in the order the step runs them: per layer, its attention's
    input projections, the attention's products against the cache (``AttentionFloor``'s), its output
    projection and its MLP's weights; then the output layer. At ``attention``'s two lengths. The same products
    as ``MatmulFloor`` plus ``AttentionFloor``, but not back to back: between a layer's weights the step reads
    its cache, which leaves fewer of the next weights in the processor's caches (on 2 CPU cores the step ran 8%
    slower than the two floors apart in the bench, 18-22% in a separate test)."""

    def __init__(self, weights: MatmulFloor, attention: AttentionFloor) -> None:
        layers: dict[int, tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]] = {}
        rest: list[tuple[Tensor, Tensor]] = []
        for name, pair in zip(weights.names, weights.pairs, strict=True):
            match = re.match(r"decoder\.layers\.(\d+)\.", name)
            if match is None:
                rest.append(pair)
                continue
            before, after = layers.setdefault(int(match.group(1)), ([], []))
            inputs = ".self_attention." in name and ".linear_proj." not in name
            (before if inputs else after).append(pair)
        if len(layers) != attention.layers:
            raise ValueError(f"{len(layers)} layers of weights but {attention.layers} of attention")
        self.lengths, self.steps, self.clock = attention.lengths, weights.steps, weights.clock
        self.products = {}
        for n in self.lengths:
            att = attention.products[n]
            self.products[n] = [
                pair
                for i, (before, after) in enumerate(layers[k] for k in sorted(layers))
                for pair in (*before, *att[2 * i : 2 * i + 2], *after)
            ] + rest
        self._start()


def mean_attended(prompt_lengths: list[int], response_lengths: list[int]) -> float:
    """The mean number of cached positions a generated token attends: a response of ``n`` tokens after a prompt
    of ``p`` attends ``p + 1, ..., p + n`` (itself included), averaged over every generated token."""
    tokens = sum(response_lengths)
    if tokens == 0:
        return 0.0
    total = sum(n * p + n * (n + 1) / 2 for p, n in zip(prompt_lengths, response_lengths, strict=True))
    return total / tokens


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, repeats: int = 20) -> float:
    """Device memory bandwidth in bytes/s: a large device-to-device copy, counting bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        return 2 * nbytes * repeats / (time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * nbytes * repeats / (start.elapsed_time(end) / 1e3)


def decode_floor(weight_bytes: int, cache_bytes_per_token: float, lengths: list[int], steps: int, bw: float) -> float:
    """Seconds for ``steps`` decode steps if each read every weight once plus each row's cache up to its
    position (``lengths``: prompt lengths) at ``bw`` bytes/s."""
    cached = sum(n + t for t in range(steps) for n in lengths)  # cached tokens read over all steps
    return (steps * weight_bytes + cached * cache_bytes_per_token) / bw
