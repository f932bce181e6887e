"""megatron-core's multi-tensor optimizer ops on torch's ``_foreach`` kernels, where neither Transformer Engine nor
apex provides them.

Without TE and apex, megatron-core 0.16.1 falls back to ``megatron.core.utils.local_multi_tensor_*`` and a copy
loop:

* the gradient norm (grad clipping, every step) takes one ``torch.norm`` per gradient and then builds a host
  tensor from the list of device scalars: one device-to-host read, a full sync, per parameter tensor (for the
  dsv3-proxy on the H200, a hundred or more syncs a step, the "per-tensor norm reads" of its breakdown);
* the bf16 optimizer copies its fp32 main parameters into the model one tensor at a time, and clipping scales
  one tensor at a time.

``install`` rebinds exactly those fallbacks (a binding TE or apex made is left alone) to the functions below:
the norm stays on the device until megatron reads the total once, and copies and scales are multi-tensor
kernels. The arithmetic is the same (fp32 norms of each tensor, then the norm of those), so results match the
fallbacks'.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor


def foreach_l2_norm(
    chunk_size: int, noop_flag: Tensor | None, tensor_lists: list[list[Tensor]], per_tensor: bool, *args: object
) -> tuple[Tensor, None]:
    """The l2 norm of every tensor of ``tensor_lists`` together, as a (1,) fp32 tensor on their device (the
    signature of ``amp_C.multi_tensor_l2norm`` under megatron's ``multi_tensor_applier``; no per-tensor norms)."""
    tensors = [t for tensors in tensor_lists for t in tensors]
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)  # one fp32 scalar per tensor, on the device
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def foreach_scale(chunk_size: int, noop_flag: Tensor | None, tensor_lists: list[list[Tensor]], scale: float) -> None:
    """``tensor_lists[1][i] = tensor_lists[0][i] * scale`` (``amp_C.multi_tensor_scale``'s signature)."""
    src, dst = tensor_lists
    if not src:
        return
    if all(s is d for s, d in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale) if scale != 1.0 else src)


def foreach_copy(this: list[Tensor], that: list[Tensor], overflow_buf: Tensor | None = None) -> None:
    """Copy ``this[i]`` into ``that[i]`` (megatron's ``_multi_tensor_copy_this_to_that``, whose bf16 path is a loop)."""
    if this:
        torch._foreach_copy_(that, this)


_REPLACED = {
    ("megatron.core.optimizer.clip_grads", "l2_norm_impl"): ("local_multi_tensor_l2_norm", foreach_l2_norm),
    ("megatron.core.optimizer.clip_grads", "multi_tensor_scale_impl"): ("local_multi_tensor_scale", foreach_scale),
    ("megatron.core.optimizer.optimizer", "multi_tensor_scale_impl"): ("local_multi_tensor_scale", foreach_scale),
    ("megatron.core.optimizer.optimizer", "_multi_tensor_copy_this_to_that"): (
        "_multi_tensor_copy_this_to_that",
        foreach_copy,
    ),
}
"""(module, attribute) -> (the name of megatron-core's fallback bound there, its replacement)."""


def install() -> list[str]:
    """Rebind megatron-core's fallbacks (only those: TE's or apex's kernels stay); returns what is rebound now."""
    done = []
    for (module_name, attr), (fallback, replacement) in _REPLACED.items():
        module = importlib.import_module(module_name)
        current = getattr(module, attr)
        if current is replacement or getattr(current, "__name__", None) != fallback:
            continue
        setattr(module, attr, replacement)
        done.append(f"{module_name}.{attr}")
    return done
