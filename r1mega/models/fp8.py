"""DeepSeek-V3's fine-grained FP8 recipe for megatron-core's local linear layers, through torch's scaled matmul.

The recipe (DeepSeek-V3 report, section 3.3): activations and output gradients are quantised to e4m3 in
1x128 tiles (one scale per token per 128 channels), weights in 128x128 blocks; every GEMM accumulates in
fp32 and writes bf16; master weights stay in higher precision (bf16 parameters here, fp32 in the
optimizer). The weight-gradient GEMM contracts over tokens, so both of its operands are quantised in
tiles along the token dimension (DeepSeek's 128x1 tiles).

One GEMM helper serves all three products (``a @ b.T`` with ``a`` (M, K) in 1x128 tiles and ``b`` (N, K)
in 128x128 blocks or 1x128 tiles), run by the first path that works, decided once per process by a small
probe on the device (``fp8_gemm_path``):

1. ``scaled_mm``: ``torch.nn.functional.scaled_mm`` with ``ScalingType.BlockWise1x128`` /
   ``BlockWise128x128`` (torch >= 2.10, ``torch._scaled_mm_v2``), cuBLASLt >= 12.9 on SM90 only;
2. ``_scaled_mm``: the older ``torch._scaled_mm``, which infers the same recipes from the scale shapes and
   strides; it takes 128x128 scales unpadded, so it is used only when ``ceil(K/128)`` is a multiple of 4
   (other GEMMs fall back to emulation);
3. ``emulation``: dequantise to fp32 and multiply (the CPU path, and any GPU other than Hopper). The
   numerics are the same quantise-dequantise maths, so the CPU tests check the recipe itself.

The layer classes keep megatron's tensor-parallel communication (sequence-parallel all-gather and
reduce-scatter, dgrad all-reduce) through megatron's own mapping functions around the FP8 GEMMs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.utils import get_tensor_model_parallel_group_if_none

from r1mega.utils.logging import get_logger

log = get_logger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
"""Largest finite e4m3 value; a tile's scale is amax / 448, so its largest element maps to +-448."""
BLOCK = 128
PATHS = ("scaled_mm", "_scaled_mm", "emulation")

_path: str | None = None
_logged: set[str] = set()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _info_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.info(message)


# ---- quantisation -----------------------------------------------------------------------------------------


def quantize_1x128(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-128-column-tile e4m3 quantisation (DeepSeek's ``act_quant``).

    x (M, K) -> (x_fp8 (M, K) e4m3, scales (M, ceil(K/128)) fp32) with x ~ x_fp8 * scale tile by tile;
    scale = amax(|tile|) / 448, and 1 for an all-zero tile (its elements quantise to 0 either way).
    """
    m, k = x.shape
    kb = _ceil_div(k, BLOCK)
    tiles = F.pad(x.float(), (0, kb * BLOCK - k)).view(m, kb, BLOCK)  # (M, kb, 128)
    amax = tiles.abs().amax(dim=-1)  # (M, kb)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (tiles / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)  # (M, kb, 128)
    q = q.view(m, kb * BLOCK)
    return (q if kb * BLOCK == k else q[:, :k].contiguous()), scale


def quantize_128x128(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-128x128-block e4m3 quantisation (DeepSeek's ``weight_quant``).

    w (N, K) -> (w_fp8 (N, K) e4m3, scales (ceil(N/128), ceil(K/128)) fp32), scale = amax(|block|) / 448.
    The blocks of ``w.T`` are the transposed blocks of ``w``: transpose ``w_fp8`` and the scales together.
    """
    n, k = w.shape
    nb, kb = _ceil_div(n, BLOCK), _ceil_div(k, BLOCK)
    blocks = F.pad(w.float(), (0, kb * BLOCK - k, 0, nb * BLOCK - n)).view(nb, BLOCK, kb, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))  # (nb, kb)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)  # (nb, 128, kb, 128)
    q = q.view(nb * BLOCK, kb * BLOCK)
    return (q if (nb * BLOCK, kb * BLOCK) == (n, k) else q[:n, :k].contiguous()), scale


def dequantize_1x128(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_1x128``: q (M, K) e4m3, scale (M, ceil(K/128)) -> (M, K) in ``dtype``."""
    k = q.shape[1]
    return (q.float() * scale.repeat_interleave(BLOCK, dim=1)[:, :k]).to(dtype)  # (M, K)


def dequantize_128x128(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_128x128``: q (N, K) e4m3, scale (ceil(N/128), ceil(K/128)) -> (N, K)."""
    n, k = q.shape
    full = scale.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)[:n, :k]  # (N, K)
    return (q.float() * full).to(dtype)


class _Fused:
    """A quantisation function compiled for CUDA tensors (``torch.compile``, dynamic shapes): one fused kernel
    where eager torch launches about ten (the float copy, padding, abs, amax, scale, divide, clamp, cast), which
    made the FP8 step 2.3x slower than bf16 on the H200 (2026-12-04; the step waits on the host). The same
    operations on the same values: e4m3 casts round to nearest either way (tested against the eager function
    on the CPU). CPU tensors take the eager function (their compile costs more than it saves); a compile that
    fails (no Triton, say) is logged once and the eager function is used from then on."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=True)
        self.ok = True

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not (t.is_cuda and self.ok):
            return self.fn(t)
        try:
            return self.compiled(t)
        except Exception as e:  # noqa: BLE001 - any compile failure means the eager function
            self.ok = False
            _info_once(f"fp8: fused {self.fn.__name__} unavailable ({type(e).__name__}: {e}); quantising eagerly")
            return self.fn(t)


fused_quantize_1x128 = _Fused(quantize_1x128)
fused_quantize_128x128 = _Fused(quantize_128x128)


# ---- the GEMM: a @ b.T, a in 1x128 tiles, b in 128x128 blocks or 1x128 tiles ------------------------------


class _Unsupported(Exception):
    """This GEMM's shape is outside what the chosen path takes; emulate it."""


def _gemm_emulated(
    a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, b_block: str, out_dtype: torch.dtype
) -> torch.Tensor:
    a = dequantize_1x128(a_q, a_s)  # (M, K) fp32
    b = dequantize_128x128(b_q, b_s) if b_block == "128x128" else dequantize_1x128(b_q, b_s)  # (N, K) fp32
    return (a @ b.t()).to(out_dtype)  # (M, N), fp32 accumulation


def _gemm_scaled_mm(
    a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, b_block: str, out_dtype: torch.dtype
) -> torch.Tensor:
    """``F.scaled_mm`` (``_scaled_mm_v2``): A (M, K) row-major, B (K, N) column-major (``b_q.t()``).

    1x128 scales: (rows, ceil(K/128)) "outer-dim-major", strides (1, rows). 128x128 scales of B:
    (round_up(ceil(K/128), 4), ceil(N/128)) with strides (1, round_up(ceil(K/128), 4)): K-block-major
    with the K-block count padded to a multiple of 4, as cuBLASLt requires.
    """
    st = F.ScalingType
    scale_a = a_s.t().contiguous().t()  # (M, kb), strides (1, M)
    if b_block == "128x128":
        kb = b_s.shape[1]
        scale_b = F.pad(b_s, (0, -kb % 4)).t()  # (round_up(kb, 4), nb), strides (1, round_up(kb, 4))
        recipe_b = st.BlockWise128x128
    else:
        scale_b = b_s.t().contiguous().t()  # (N, kb), strides (1, N)
        recipe_b = st.BlockWise1x128
    return F.scaled_mm(a_q, b_q.t(), scale_a, st.BlockWise1x128, scale_b, recipe_b, output_dtype=out_dtype)


def _gemm_scaled_mm_v1(
    a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, b_block: str, out_dtype: torch.dtype
) -> torch.Tensor:
    """``torch._scaled_mm``: the recipe is inferred from ``scale_a`` and ``scale_b.t()`` (checked against ``b.t()``).

    1x128 A: (M, ceil(K/128)) strides (1, M). 128x128 B: ``scale_b.t()`` (ceil(N/128), ceil(K/128)) row-major,
    unpadded, so only ceil(K/128) % 4 == 0 keeps cuBLASLt's padded-leading-dimension contract. 1x128 B:
    ``scale_b.t()`` (N, ceil(K/128)) strides (1, N), i.e. ``scale_b`` is (ceil(K/128), N) row-major.
    """
    scale_a = a_s.t().contiguous().t()  # (M, kb), strides (1, M)
    if b_block == "128x128":
        if b_s.shape[1] % 4:
            raise _Unsupported(f"ceil(K/128)={b_s.shape[1]} is not a multiple of 4")
        scale_b = b_s.t()  # (kb, nb), strides (1, kb)
    else:
        scale_b = b_s.t().contiguous()  # (kb, N) row-major
    return torch._scaled_mm(a_q, b_q.t(), scale_a, scale_b, out_dtype=out_dtype)


_GEMMS = {"scaled_mm": _gemm_scaled_mm, "_scaled_mm": _gemm_scaled_mm_v1, "emulation": _gemm_emulated}


def blockwise_gemm(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    b_block: str,
    out_dtype: torch.dtype,
    path: str | None = None,
) -> torch.Tensor:
    """``a @ b.T`` for a (M, K) in 1x128 tiles and b (N, K) in ``b_block`` ("128x128" or "1x128") -> (M, N).

    ``path`` defaults to ``fp8_gemm_path()`` for CUDA tensors and ``emulation`` elsewhere.
    """
    if path is None:
        path = fp8_gemm_path() if a_q.is_cuda else "emulation"
    try:
        return _GEMMS[path](a_q, a_s, b_q, b_s, b_block, out_dtype)
    except _Unsupported as e:
        _info_once(f"fp8: {path} cannot run a {b_block} GEMM of shape {tuple(b_q.shape)} ({e}); emulating it")
        return _gemm_emulated(a_q, a_s, b_q, b_s, b_block, out_dtype)


# ---- choosing the path once per process ------------------------------------------------------------------


def _probe(path: str, device: torch.device) -> str | None:
    """None if ``path`` runs both recipes on ``device`` and matches the emulation; else why not."""
    gen = torch.Generator(device=device).manual_seed(0)
    m, n = 256, 256
    k = 512 if path == "_scaled_mm" else 384  # 384: 3 K-blocks, exercises the multiple-of-4 padding
    a = torch.randn(m, k, device=device, generator=gen, dtype=torch.float32)
    w = torch.randn(n, k, device=device, generator=gen, dtype=torch.float32)
    a_q, a_s = quantize_1x128(a)
    try:
        for b_block, (b_q, b_s) in (("128x128", quantize_128x128(w)), ("1x128", quantize_1x128(w))):
            # bf16 out, what the layers ask for: cuBLASLt's block-scaled FP8 kernels are documented for bf16 D.
            got = _GEMMS[path](a_q, a_s, b_q, b_s, b_block, torch.bfloat16)
            want = _gemm_emulated(a_q, a_s, b_q, b_s, b_block, torch.float32)
            err = ((got.float() - want).norm() / want.norm()).item()
            if not math.isfinite(err) or err > 1e-2:  # bf16 rounding of the output is ~4e-3
                return f"{b_block} result differs from the emulation by {err:.2e} (relative norm)"
        torch.cuda.synchronize(device)
    except Exception as e:  # a missing op, an unsupported layout, an old cuBLASLt: all mean "next path"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def fp8_gemm_path() -> str:
    """The GEMM path FP8 layers use on this process's CUDA device: ``scaled_mm``, ``_scaled_mm`` or ``emulation``.

    Decided on the first call by a probe matmul on the current device, then cached; the choice and the
    reason for every fallback are logged at INFO. Without CUDA it is ``emulation``.
    """
    global _path
    if _path is not None:
        return _path
    if not torch.cuda.is_available():
        _path, reasons = "emulation", ["no CUDA device"]
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        capability = torch.cuda.get_device_capability(device)
        reasons = []
        if capability != (9, 0):
            reasons.append(
                f"blockwise FP8 GEMMs need SM90 (Hopper) in cuBLASLt; this GPU is sm_{capability[0]}{capability[1]}"
            )
        else:
            if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
                reasons.append(f"scaled_mm: torch {torch.__version__} has no torch.nn.functional.scaled_mm")
            elif (why := _probe("scaled_mm", device)) is None:
                _path = "scaled_mm"
            else:
                reasons.append(f"scaled_mm: {why}")
            if _path is None:
                why = _probe("_scaled_mm", device)
                if why is None:
                    _path = "_scaled_mm"
                else:
                    reasons.append(f"_scaled_mm: {why}")
        _path = _path or "emulation"
    suffix = f" (fallbacks: {'; '.join(reasons)})" if reasons else ""
    log.info("fp8: blockwise GEMM path is %s%s", _path, suffix)
    return _path


# ---- the linear function ---------------------------------------------------------------------------------


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    """Zero-pad the token dimension to a multiple of 128 (cuBLASLt's scale alignment; exact for every GEMM)."""
    return F.pad(t, (0, 0, 0, -t.shape[0] % BLOCK)) if t.shape[0] % BLOCK else t


class _FP8BlockwiseLinear(torch.autograd.Function):
    """y = x @ w.T with the three GEMMs in DeepSeek-V3's FP8 recipe; x (M, K), w (N, K)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        x_p = _pad_rows(x)  # (Mp, K)
        x_q, x_s = fused_quantize_1x128(x_p)  # (Mp, K), (Mp, K/128)
        w_q, w_s = fused_quantize_128x128(weight)  # (N, K), (N/128, K/128)
        out = blockwise_gemm(x_q, x_s, w_q, w_s, "128x128", x.dtype)[:m]  # (M, N)
        ctx.save_for_backward(x, w_q, w_s)
        ctx.weight_dtype = weight.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, w_q, w_s = ctx.saved_tensors
        m = x.shape[0]
        dy = _pad_rows(grad_out.contiguous())  # (Mp, N)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            dy_q, dy_s = fused_quantize_1x128(dy)  # 1x128 along N, the contraction dim of dgrad
            # dgrad = dy @ w: b = w.T (K, N) in the transposed 128x128 blocks of w
            grad_x = blockwise_gemm(dy_q, dy_s, w_q.t().contiguous(), w_s.t().contiguous(), "128x128", x.dtype)[:m]
        if ctx.needs_input_grad[1]:
            # wgrad = dy.T @ x contracts over tokens: both operands in 1x128 tiles along the token dim
            dyt_q, dyt_s = fused_quantize_1x128(dy.t().contiguous())  # (N, Mp), (N, Mp/128)
            xt_q, xt_s = fused_quantize_1x128(_pad_rows(x).t().contiguous())  # (K, Mp), (K, Mp/128)
            # fp32 accumulation inside the GEMM; written in the weight's dtype (bf16 weights: megatron adds it
            # into the fp32 main_grad), fp32 for fp32 weights.
            out_dtype = torch.bfloat16 if ctx.weight_dtype == torch.bfloat16 else torch.float32
            grad_w = blockwise_gemm(dyt_q, dyt_s, xt_q, xt_s, "1x128", out_dtype).to(ctx.weight_dtype)  # (N, K)
        return grad_x, grad_w


def fp8_blockwise_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` through DeepSeek-V3's FP8 recipe; x (..., K), weight (N, K) -> (..., N) in x's dtype.

    The gradient of ``weight`` comes back in the weight's dtype; K and N should be multiples of 128 for the
    GPU paths (layers check this when they are built).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, K)
    if x2.shape[0] == 0:  # an expert that received no tokens
        return F.linear(x, weight)
    return _FP8BlockwiseLinear.apply(x2, weight).view(*lead, weight.shape[0])


# ---- megatron-core layers --------------------------------------------------------------------------------


def _fp8_shape_ok(layer: torch.nn.Module, name: str) -> bool:
    """Decide at construction whether this layer's weight takes the FP8 path (both dims multiples of 128)."""
    weight = getattr(layer, "weight", None)
    if weight is None:
        return False
    n, k = weight.shape
    if n % BLOCK or k % BLOCK:
        _info_once(f"fp8: {name} with weight {n}x{k} stays bf16 (FP8 blocks need both dims multiples of 128)")
        return False
    if layer.config.gradient_accumulation_fusion:
        _info_once(f"fp8: {name} stays bf16 (FP8 layers do not implement gradient_accumulation_fusion)")
        return False
    return True


def _fp8_forward_impl(
    layer: torch.nn.Module,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    allreduce_dgrad: bool,
    sequence_parallel: bool,
    tp_group: torch.distributed.ProcessGroup | None,
) -> torch.Tensor:
    """megatron's ``linear_with_grad_accumulation_and_async_allreduce`` with the matmul in FP8.

    Sequence parallel: all-gather the input (reduce-scatter its gradient); otherwise all-reduce the input
    gradient over TP when megatron asks for it. Without TP both are identities.
    """
    if sequence_parallel:
        group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=layer.is_expert)
        input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=group)
    elif allreduce_dgrad:
        group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=layer.is_expert)
        input = copy_to_tensor_model_parallel_region(input, group=group)
    output = fp8_blockwise_linear(input, weight)  # (seq, batch, out)
    return output + bias if bias is not None else output


class _FP8Linear:
    """What the FP8 column- and row-parallel layers share: decide once whether the weight takes the FP8 path,
    then route megatron's ``_forward_impl`` through the FP8 GEMMs (bf16 if a dim is not a multiple of 128)."""

    fp8: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fp8 = _fp8_shape_ok(self, type(self).__name__)

    def _forward_impl(self, input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # ``weight`` can be another layer's (a tied output layer): check its shape too.
        if not self.fp8 or weight.shape[0] % BLOCK or weight.shape[1] % BLOCK:
            return super()._forward_impl(input, weight, *args, **kwargs)
        return _fp8_forward_impl(
            self,
            input,
            weight,
            kwargs["bias"],
            kwargs["allreduce_dgrad"],
            kwargs["sequence_parallel"],
            kwargs.get("tp_group"),
        )


class FP8ColumnParallelLinear(_FP8Linear, ColumnParallelLinear):
    """megatron-core's local ``ColumnParallelLinear`` with DeepSeek-V3's blockwise FP8 GEMMs (bf16 if a dim isn't 128k)."""


class FP8RowParallelLinear(_FP8Linear, RowParallelLinear):
    """megatron-core's local ``RowParallelLinear`` with DeepSeek-V3's blockwise FP8 GEMMs (bf16 if a dim isn't 128k)."""


# ---- what other forward paths (the rollout engine's cached decoder) need to compute the same function ----------


def is_fp8_layer(module: torch.nn.Module) -> bool:
    """True for a linear layer whose GEMMs run in FP8 (the torch backend's layers with 128-multiple weights)."""
    return isinstance(module, (FP8ColumnParallelLinear, FP8RowParallelLinear)) and bool(module.fp8)


def fake_quantize_1x128(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., K) as an FP8 GEMM sees it: quantised in 1x128 tiles along K, dequantised to ``x.dtype``."""
    flat = x.reshape(-1, x.shape[-1])  # (tokens, K)
    return dequantize_1x128(*quantize_1x128(flat)).to(x.dtype).view(x.shape)


def fake_quantize_128x128(w: torch.Tensor) -> torch.Tensor:
    """A weight (N, K) as an FP8 GEMM sees it: quantised in 128x128 blocks, dequantised to ``w.dtype``."""
    return dequantize_128x128(*quantize_128x128(w)).to(w.dtype)
