"""Parameters and model-state memory per rank, from the analytic counts and the rank layout.

Pure Python (no torch, no megatron-core). What one rank of pipeline stage ``s`` holds:

* its decoder layers, with tensor-parallel weights divided by TP, norms and the router in full on every TP
  rank, and routed experts divided by EP x ETP (local layer specs, which split MLA's down-projections
  over TP too; Transformer Engine's MLA spec replicates them instead, a few percent more per rank at TP > 1);
* stage 0: the word embedding (vocabulary-parallel, divided by TP);
* the last stage: the final norm, the output layer (also when tied to the embedding but PP > 1, where
  megatron-core keeps a copy there), the MTP layers, and with MTP and PP > 1 a copy of the embedding
  (megatron-core's MTP embeds the shifted tokens on the last stage).

Bytes are model state only (activations, communication buffers and the allocator's slack come on top):
weights at the parameter dtype (2 bytes bf16, 4 fp32); gradients at 4 bytes with
``precision.grad_reduce_in_fp32`` (megatron-core's main-grad buffer), else the parameter dtype; Adam
state m and v in fp32 (8 bytes) plus a 4-byte fp32 master copy when parameters are bf16. The
distributed optimizer (ZeRO-1) divides the optimizer state, master copy included, over the data-parallel
group: DP x CP for dense parameters, expert-DP for expert parameters. Gradients stay whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1mega.config.schema import R1Config
from r1mega.models.params import ModelParams, count_params
from r1mega.parallel.layout import Layout


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class StageParams:
    """Parameters one rank of a pipeline stage holds."""

    stage: int
    """Pipeline stage."""
    layers: list[int]
    """Decoder-layer indices of the stage (all its virtual chunks)."""
    dense: int
    """Non-expert parameters on one rank (tensor-parallel parts divided by TP)."""
    expert: int
    """Routed-expert parameters on one rank (divided by EP x ETP)."""
    embedding: bool
    """Whether the stage holds the word embedding (first stage; also the last one with MTP and PP > 1)."""
    output: bool
    """Whether the stage holds the output layer, final norm and MTP (last stage)."""

    @property
    def total(self) -> int:
        """All parameters on one rank of this stage."""
        return self.dense + self.expert


def stage_params(cfg: R1Config, lay: Layout, params: ModelParams | None = None) -> list[StageParams]:
    """Parameters per rank for every pipeline stage."""
    m = cfg.model
    params = params or count_params(m)
    tp, ep_etp, pp = lay.tp, lay.ep * lay.etp, lay.pp
    vocab_per_rank = _ceil_div(params.embedding, tp)
    out: list[StageParams] = []
    for s, chunks in enumerate(lay.stage_chunks):
        indices = [i for chunk in chunks for i in chunk]
        held = [params.layers[i] for i in indices]
        first, last = s == 0, s == pp - 1
        if last:
            held = held + params.mtp_layers
        dense = sum(_ceil_div(layer.tp_sharded, tp) + layer.replicated for layer in held)
        expert = sum(layer.experts // ep_etp for layer in held)
        embedding = first or (last and m.mtp_num_layers > 0)
        if embedding:
            dense += vocab_per_rank
        if last:
            dense += params.final_norm
            if not m.tie_word_embeddings or pp > 1:
                dense += vocab_per_rank
        out.append(StageParams(stage=s, layers=indices, dense=dense, expert=expert, embedding=embedding, output=last))
    return out


@dataclass(frozen=True)
class MemoryEstimate:
    """Model-state bytes on one rank of a pipeline stage."""

    params: StageParams
    """What the rank holds."""
    weights: int
    """Parameter bytes."""
    grads: int
    """Gradient-buffer bytes."""
    optimizer: int
    """Adam state (and fp32 master weights) without the distributed optimizer."""
    optimizer_distributed: int
    """The same, sharded over the data-parallel groups by the distributed optimizer."""

    @property
    def total(self) -> int:
        """Weights + gradients + optimizer, without the distributed optimizer."""
        return self.weights + self.grads + self.optimizer

    @property
    def total_distributed(self) -> int:
        """Weights + gradients + optimizer, with the distributed optimizer."""
        return self.weights + self.grads + self.optimizer_distributed


def bytes_per_param(cfg: R1Config) -> tuple[int, int, int]:
    """(weight, gradient, optimizer) bytes per parameter for the precision config."""
    pr = cfg.precision
    weight = 2 if pr.dtype == "bf16" else 4
    grad = 4 if pr.grad_reduce_in_fp32 else weight
    optimizer = 8 + (4 if pr.dtype == "bf16" else 0)  # Adam m, v (+ fp32 master copy)
    return weight, grad, optimizer


def stage_memory(cfg: R1Config, lay: Layout, params: ModelParams | None = None) -> list[MemoryEstimate]:
    """Model-state bytes per rank for every pipeline stage."""
    weight, grad, optim = bytes_per_param(cfg)
    estimates = []
    for sp in stage_params(cfg, lay, params):
        distributed = _ceil_div(sp.dense * optim, lay.dp * lay.cp) + _ceil_div(sp.expert * optim, lay.expert_dp)
        estimates.append(
            MemoryEstimate(
                params=sp,
                weights=sp.total * weight,
                grads=sp.total * grad,
                optimizer=sp.total * optim,
                optimizer_distributed=distributed,
            )
        )
    return estimates


def peak_memory(estimates: list[MemoryEstimate], distributed: bool) -> MemoryEstimate:
    """The stage whose ranks need the most model-state memory."""
    return max(estimates, key=lambda e: e.total_distributed if distributed else e.total)
