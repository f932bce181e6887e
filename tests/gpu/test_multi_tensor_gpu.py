"""On CUDA, the gradient norm through ``r1mega.train.multi_tensor`` never waits for the device, while megatron-core's
fallback (no TE, no apex) does, once per tensor; the values agree."""

from __future__ import annotations

import pytest
import torch
from megatron.core import utils as mcore_utils

from r1mega.train import multi_tensor

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_the_foreach_grad_norm_does_not_sync_and_matches_megatron_s_fallback() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(n, 64, device="cuda", generator=gen) for n in (1, 7, 128, 1000)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got, _ = multi_tensor.foreach_l2_norm(2048, None, [grads], False)
        multi_tensor.foreach_scale(2048, None, [grads, [g.clone() for g in grads]], 0.5)
        with pytest.raises(RuntimeError, match="called a synchronizing CUDA operation"):
            mcore_utils.local_multi_tensor_l2_norm(2048, None, [grads], False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want, _ = mcore_utils.local_multi_tensor_l2_norm(2048, None, [grads], False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
