"""megatron-core's multi-tensor optimizer fallbacks (no TE, no apex) rebound to torch's foreach kernels
(``r1mega.train.multi_tensor``): the same values, only the fallbacks replaced, and a grad-norm step that
reads the device once."""

from __future__ import annotations

import importlib

import pytest
import torch
from megatron.core import utils as mcore_utils
from torch.utils._python_dispatch import TorchDispatchMode

from r1mega.config.load import compose_config
from r1mega.parallel.bootstrap import single_process
from r1mega.train import multi_tensor

CLIP = "megatron.core.optimizer.clip_grads"
OPTIM = "megatron.core.optimizer.optimizer"


def _tensors(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (7,), (0,), (4, 4, 2), (129,)]
    out = [torch.randn(s, generator=gen) for s in shapes]
    out[1] = out[1].bfloat16()  # mixed dtypes: each norm is taken in fp32
    return out


def test_l2_norm_is_the_norm_of_everything() -> None:
    tensors = _tensors()
    want = torch.linalg.vector_norm(torch.cat([t.float().flatten() for t in tensors]))
    got, per_tensor = multi_tensor.foreach_l2_norm(2048, None, [tensors[:2], tensors[2:]], False)
    assert per_tensor is None and got.shape == (1,) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], want, rtol=1e-6, atol=0)


def test_scale_in_place_and_into_other_tensors() -> None:
    src = _tensors(1)
    dst = [torch.zeros_like(t, dtype=torch.bfloat16) for t in src]
    multi_tensor.foreach_scale(2048, None, [src, dst], 0.5)
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d, (s * 0.5).bfloat16())
    same = [t.clone() for t in src]
    multi_tensor.foreach_scale(2048, None, [same, same], 3.0)
    for s, d in zip(src, same, strict=True):
        assert torch.equal(d, s * 3.0)
    fp32 = [t.float() for t in src]
    multi_tensor.foreach_scale(2048, None, [fp32, dst], 1.0)  # megatron copies through a scale of 1
    for s, d in zip(fp32, dst, strict=True):
        assert torch.equal(d, s.bfloat16())
    multi_tensor.foreach_copy(src[:0], dst[:0])  # empty lists are a no-op
    multi_tensor.foreach_copy(fp32, dst)
    assert all(torch.equal(d, s.bfloat16()) for s, d in zip(fp32, dst, strict=True))


class _Reads(TorchDispatchMode):
    """Counts the host reads of tensor values (``item()``, ``float()``) dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_install_rebinds_only_megatron_s_fallbacks_and_the_grad_norm_reads_once(monkeypatch) -> None:
    clip, optim = importlib.import_module(CLIP), importlib.import_module(OPTIM)
    monkeypatch.setattr(clip, "l2_norm_impl", mcore_utils.local_multi_tensor_l2_norm)  # as without TE and apex
    monkeypatch.setattr(clip, "multi_tensor_scale_impl", mcore_utils.local_multi_tensor_scale)
    monkeypatch.setattr(optim, "multi_tensor_scale_impl", object())  # a kernel TE or apex would have bound: kept
    kept = optim.multi_tensor_scale_impl

    def _multi_tensor_copy_this_to_that(this, that, overflow_buf=None) -> None:  # noqa: ANN001
        """A stand-in for megatron's copy loop (an earlier trainer in this process may have rebound it)."""

    monkeypatch.setattr(optim, "_multi_tensor_copy_this_to_that", _multi_tensor_copy_this_to_that)
    done = multi_tensor.install()
    assert sorted(done) == sorted([f"{CLIP}.l2_norm_impl", f"{CLIP}.multi_tensor_scale_impl",
                                   f"{OPTIM}._multi_tensor_copy_this_to_that"])  # fmt: skip
    assert optim.multi_tensor_scale_impl is kept
    assert clip.l2_norm_impl is multi_tensor.foreach_l2_norm and multi_tensor.install() == []  # once

    grads = [t.float() for t in _tensors(2)]
    with single_process(compose_config([])):  # a process group (and, on a CPU, megatron's device="cuda" shim)
        reads = _Reads()
        with reads:
            norm = clip.get_grad_norm_fp32(grads, grad_stats_parallel_group=torch.distributed.group.WORLD)
    want = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    assert norm == pytest.approx(want, rel=1e-6)
    # megatron's own .item() of the total only. The fallback also reads every tensor's norm (torch.tensor of a
    # list of device scalars, a copy per element that does not pass the dispatcher on a CPU) and its total.
    assert reads.reads == 1
