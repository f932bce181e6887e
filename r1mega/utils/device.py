"""Where a run's tensors live, and moving host-built batches there.

Batches, prompts and reward bookkeeping are built on the host (Python lists, tokenizers); the model,
its losses and every collective work on the run's device. On CUDA the device is this process's current
GPU (``r1mega.parallel.bootstrap`` sets it from ``LOCAL_RANK``) and NCCL only accepts tensors there;
without CUDA it is the CPU (gloo).

Host-to-device copies go through pinned memory with ``non_blocking=True``, so the host does not wait
for the copy and the copy is ordered before the kernels that read it on the same stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch


def current_device() -> torch.device:
    """This process's compute device: its current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` multiplies groups of rows by stacked weights on ``device`` in ``dtype``: on
    the CPU in any float dtype; on CUDA in bf16 from Hopper (sm_90) on."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9


def to_device(value: Any, device: torch.device | None = None) -> Any:
    """``value`` with every tensor (also inside dicts, lists and tuples) on ``device`` (default: the current one).

    CPU tensors bound for CUDA are pinned first and copied asynchronously; tensors already there are
    returned as they are (no copy).
    """
    device = device or current_device()
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        if device.type == "cuda" and value.device.type == "cpu":
            # pin_memory refuses views whose elements share memory (an expanded position_ids): copy those first
            return value.contiguous().pin_memory().to(device, non_blocking=True)
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def device_batches(batches: Iterable[Any], device: torch.device | None = None) -> Iterator[Any]:
    """Each batch of ``batches`` moved to ``device``, one batch ahead: the next copy is in flight while the
    current micro-batch computes."""
    device = device or current_device()
    iterator = iter(batches)
    try:
        ahead = to_device(next(iterator), device)
    except StopIteration:
        return
    for batch in iterator:
        current, ahead = ahead, to_device(batch, device)
        yield current
    yield ahead


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""``/proc/cpuinfo`` flags of CPUs that compute bf16 matrix products natively."""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX); without, torch emulates bf16 matmuls, several
    times slower than fp32. ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when None); True when unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    flags = {
        flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()
    }
    return bool(flags & set(BF16_CPU_FLAGS))
