"""Routed experts as two grouped matmuls (``torch._grouped_mm``) for megatron-core's local layer spec.

megatron-core's local MoE runs its experts one at a time (``SequentialMLP``: two linears, an activation and a
split per expert, forward and backward), so a layer of 16 experts launches some hundred small kernels and
Python calls per step: the dsv3-proxy on the H200 left the GPU idle 68% of its step. Its ``GroupedMLP`` does
the experts in two grouped GEMMs, but through the ``grouped_gemm`` package, a CUDA build that is not on any
package index. ``TorchGroupedMLP`` is that module with ``torch._grouped_mm`` (cuBLAS/CUTLASS grouped GEMM in
bf16 on Hopper; a CPU kernel in any float dtype) in its place: megatron-core's parameters, initialisation,
tensor and expert parallelism and distributed-checkpoint format (whose weights load into ``SequentialMLP`` and
back) are kept; only the matmuls differ.

Each expert's rows are padded to a multiple of 16 bytes' worth of rows (8 in bf16), and to at least that many.
The weight gradient is a grouped GEMM whose contraction runs over each expert's rows, and the grouped kernels
read a group only from a 16-byte-aligned start (the forward needs no padding; torchtitan pads the same way,
``TOKEN_GROUP_ALIGN_SIZE_M``). No group is empty: zero-row groups got nonzero weight gradients from some
grouped-GEMM kernels (pytorch/pytorch#172439 on Blackwell, #174314 on ROCm), while a group holding only
zero-valued padding rows gives exact zeros everywhere. The padded buffer has a fixed size (rows + experts x alignment, rounded up), so nothing
is read back to the host, and the last expert's group takes the slack: every buffer row is in some group, so the
kernels write every row of their outputs (rows outside the groups are left uninitialised), and padding rows are
zeros, so they add nothing to any output or gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe import grouped_gemm_util
from megatron.core.transformer.moe.experts import GroupedMLP
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

GROUP_ALIGN_BYTES = 16
"""Each expert's group starts at a multiple of 16 bytes' worth of rows (8 rows in bf16): the grouped kernels'
TMA loads of the weight gradient's operands."""


@contextmanager
def _grouped_gemm_check_skipped() -> Iterator[None]:
    """``GroupedMLP.__init__`` asserts that the ``grouped_gemm`` package imports; this subclass never calls it."""
    check = grouped_gemm_util.assert_grouped_gemm_is_available
    grouped_gemm_util.assert_grouped_gemm_is_available = lambda: None
    try:
        yield
    finally:
        grouped_gemm_util.assert_grouped_gemm_is_available = check


def aligned_groups(counts: Tensor, rows: int, align: int) -> tuple[Tensor, Tensor, int]:
    """Where ``rows`` rows grouped by expert (``counts`` per expert, summing to ``rows``) go in a buffer whose
    groups start at multiples of ``align`` rows and hold at least ``align`` rows each.

    Returns (``offs``: int32 end of each group in the buffer, the last one the buffer's end; ``dest``: each
    row's buffer row; the buffer's row count). Device tensors only: no host read.
    """
    counts = counts.to(torch.long)
    padded = ((counts + align - 1) // align * align).clamp(min=align)  # (experts,)
    ends = padded.cumsum(0)
    total = -(-rows // align) * align + counts.numel() * align  # an upper bound of ends[-1], aligned
    offs = torch.cat([ends[:-1], ends.new_full((1,), total)]).to(torch.int32)
    shift = (ends - padded) - (counts.cumsum(0) - counts)  # each group's start in the buffer minus in the rows
    dest = torch.arange(rows, device=counts.device) + torch.repeat_interleave(shift, counts, output_size=rows)
    return offs, dest, total


class TorchGroupedMLP(GroupedMLP):
    """megatron-core's ``GroupedMLP`` with ``torch._grouped_mm`` for the two expert GEMMs (see the module doc).

    ``weight1`` (hidden, experts x fc1 out) and ``weight2`` (experts x fc2 in, hidden) as in megatron-core;
    biases are refused there (``add_bias_linear=False``), as are FP8 linears here (``validate``).
    """

    def __init__(
        self, num_local_experts: int, config: TransformerConfig, pg_collection: ProcessGroupCollection | None = None
    ) -> None:
        if not hasattr(torch, "_grouped_mm"):  # torch 2.9+
            raise RuntimeError(f"torch {torch.__version__} has no torch._grouped_mm; set model.moe_experts=sequential")
        with _grouped_gemm_check_skipped():
            super().__init__(num_local_experts, config, pg_collection)
        if self.activation_recompute:  # refused by r1mega.config.validate
            raise ValueError("moe_act recompute needs Transformer Engine (megatron-core's CheckpointWithoutOutput)")
        if config.moe_apply_probs_on_input:  # r1mega's configs never set it; the decoder does not support it either
            raise ValueError("TorchGroupedMLP applies the routing probabilities after the activation only")
        # megatron-core wraps its version in torch.compile (``jit_fuser``), one compilation per layer's closure.
        self.activation_func_with_probs = self._activation_with_probs

    def stacked_weights(self) -> tuple[Tensor, Tensor]:
        """Views of ``weight1`` as (experts, hidden, fc1 out) and ``weight2`` as (experts, fc2 in, hidden): each
        expert's block is contiguous in megatron-core's layout, and the layer multiplies rows by them (x @ w)."""
        experts, hidden = self.num_local_experts, self.config.hidden_size
        return self.weight1.view(experts, hidden, -1), self.weight2.view(experts, -1, hidden)

    def _activation_with_probs(self, h: Tensor, probs: Tensor) -> Tensor:
        """The activation (gated: on the first half, times the second) weighted by each row's routing prob."""
        if self.config.gated_linear_unit:
            gate, up = h.chunk(2, dim=-1)
            out = self.config.activation_func(gate) * up
        else:
            out = self.config.activation_func(h)
        return (out * probs).to(h.dtype)

    def forward(
        self, permuted_local_hidden_states: Tensor, tokens_per_expert: Tensor, permuted_probs: Tensor
    ) -> tuple[Tensor, None]:
        """The experts on their tokens, grouped by expert in order (the token dispatcher's output)."""
        x, probs = permuted_local_hidden_states, permuted_probs  # (rows, hidden), (rows,)
        w1, w2 = self.stacked_weights()  # (experts, hidden, fc1 out), (experts, fc2 in, hidden)
        counts = tokens_per_expert.to(x.device, non_blocking=True)
        offs, dest, total = aligned_groups(counts, x.shape[0], max(1, GROUP_ALIGN_BYTES // x.element_size()))
        x = x.new_zeros(total, x.shape[1]).index_copy(0, dest, x)  # (buffer rows, hidden), padding rows zero
        probs = probs.new_zeros(total).index_copy(0, dest, probs).unsqueeze(-1)  # (buffer rows, 1)
        h = torch._grouped_mm(x, w1, offs=offs)  # (buffer rows, fc1 out)
        h = self.activation_func_with_probs(h, probs)  # (buffer rows, fc2 in)
        y = torch._grouped_mm(h, w2, offs=offs)  # (buffer rows, hidden)
        return y[dest], None  # (rows, hidden), the dispatcher's order
