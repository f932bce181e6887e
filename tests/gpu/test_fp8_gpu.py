"""The blockwise FP8 GEMMs on CUDA (torch scaled matmul on Hopper) against the fp32 emulation of the same maths."""

from __future__ import annotations

import pytest
import torch

from r1mega.models import fp8

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_hopper_uses_a_real_fp8_gemm() -> None:
    path = fp8.fp8_gemm_path()
    print(f"fp8 gemm path: {path}")
    if torch.cuda.get_device_capability() == (9, 0):
        assert path != "emulation", "SM90 should run torch's blockwise scaled matmul; see the INFO log for why not"


@pytest.mark.parametrize("k", [384, 512])  # 3 K-blocks (padded scales) and 4
@pytest.mark.parametrize("b_block", ["128x128", "1x128"])
def test_gemm_matches_emulation(b_block: str, k: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(512, k, device="cuda", generator=gen).to(torch.bfloat16)
    b = torch.randn(768, k, device="cuda", generator=gen).to(torch.bfloat16)
    a_q, a_s = fp8.quantize_1x128(a)
    b_q, b_s = fp8.quantize_128x128(b) if b_block == "128x128" else fp8.quantize_1x128(b)
    got = fp8.blockwise_gemm(a_q, a_s, b_q, b_s, b_block, torch.bfloat16)
    want = fp8.blockwise_gemm(a_q, a_s, b_q, b_s, b_block, torch.float32, path="emulation")
    assert got.shape == (512, 768) and got.dtype == torch.bfloat16
    assert _rel(got, want) < 1e-2


@pytest.mark.parametrize("m", [4096, 1000])
def test_linear_forward_and_grads_match_emulation(m: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(m, 1024, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(1536, 1024, device="cuda", generator=gen) * 0.03).to(torch.bfloat16)
    dy = torch.randn(m, 1536, device="cuda", generator=gen).to(torch.bfloat16)
    results = []
    for device in ("cuda", "cpu"):  # the CPU runs the emulation of the same recipe
        xr, wr = x.detach().to(device).clone().requires_grad_(), w.detach().to(device).clone().requires_grad_()
        y = fp8.fp8_blockwise_linear(xr, wr)
        y.backward(dy.to(device))
        results.append([t.detach().cuda() for t in (y, xr.grad, wr.grad)])
    for got, want in zip(*results, strict=True):
        assert _rel(got, want) < 1e-2
    exact = x.float() @ w.float().t()
    assert _rel(results[0][0], exact) < 0.06


def test_fused_quantisation_compiles_on_the_gpu_and_gives_the_eager_codes() -> None:
    """CUDA tensors take the compiled quantisers (one Triton kernel each): they compile on this machine (else
    FP8 layers quantise eagerly, with a logged reason) and give the eager codes and scales bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    for quantizer, shape in ((fp8.fused_quantize_1x128, (1000, 1024)), (fp8.fused_quantize_128x128, (1536, 1024))):
        x = torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16)
        q, s = quantizer(x)
        q_ref, s_ref = quantizer.fn(x)
        assert quantizer.ok, f"{quantizer.fn.__name__} did not compile: see the INFO log"
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
