"""Grouped experts (``torch._grouped_mm``) on CUDA: the layer's forward and its gradients against per-expert fp32
matmuls of the same weights, with expert groups of every size (the weight gradient's grouped GEMM reads each
group from a 16-byte-aligned start) and exact zero gradients for experts without tokens, and
``model.moe_experts=auto`` choosing them on a bf16 Hopper GPU."""

from __future__ import annotations

import pytest
import torch

from r1mega.config.load import compose_config
from r1mega.config.validate import detect_accelerator, moe_experts
from r1mega.models.builder import build_model
from r1mega.models.grouped_experts import TorchGroupedMLP
from r1mega.parallel.bootstrap import single_process

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9, reason="bf16 grouped GEMM: sm_90+"
    ),
]

BF16 = ["precision=bf16", "precision.transformer_impl=local", "model.init_method_std=0.2"]


def _reference(
    w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, counts: list[int], probs: torch.Tensor
) -> torch.Tensor:
    """Each expert in turn: silu(x W_gate) * (x W_up) * prob, then W_down; ``w1`` (experts, hidden, 2 x ffn),
    ``w2`` (experts, ffn, hidden)."""
    outs, start = [], 0
    for e, c in enumerate(counts):
        rows = x[start : start + c]
        gate, up = (rows @ w1[e]).chunk(2, dim=-1)
        outs.append((torch.nn.functional.silu(gate) * up * probs[start : start + c, None]) @ w2[e])
        start += c
    return torch.cat(outs)


def test_auto_picks_grouped_experts_here() -> None:
    cfg = compose_config(["model=dsv3_tiny", *BF16])
    assert detect_accelerator().grouped_gemm
    assert moe_experts(cfg, detect_accelerator()) == "grouped"
    with single_process(cfg):
        model = build_model(cfg)[0]
        assert any(isinstance(m, TorchGroupedMLP) for m in model.modules())


@pytest.mark.parametrize("counts", [[0, 3, 17, 1, 9, 0, 30, 5], [8, 8, 8, 8, 8, 8, 8, 8], [0, 0, 0, 0, 0, 0, 0, 1]])
def test_grouped_experts_match_per_expert_fp32_matmuls(counts: list[int]) -> None:
    cfg = compose_config(["model=dsv3_tiny", *BF16, "model.moe_experts=grouped"])
    with single_process(cfg):
        model = build_model(cfg)[0]
        experts = next(m for m in model.modules() if isinstance(m, TorchGroupedMLP))
        assert experts.weight1.is_cuda and experts.weight1.dtype == torch.bfloat16
        gen = torch.Generator(device="cuda").manual_seed(0)
        rows, hidden = sum(counts), experts.config.hidden_size
        x = torch.randn(rows, hidden, device="cuda", generator=gen).bfloat16().requires_grad_()
        probs = torch.rand(rows, device="cuda", generator=gen)
        grad_out = torch.randn(rows, hidden, device="cuda", generator=gen).bfloat16()
        out, _ = experts(x, torch.tensor(counts), probs)  # the dispatcher hands over host counts
        out.backward(grad_out)
        got = (out.detach(), x.grad, experts.weight1.grad, experts.weight2.grad)

        x_ref = x.detach().float().requires_grad_()
        w1 = experts.weight1.detach().float().requires_grad_()
        w2 = experts.weight2.detach().float().requires_grad_()
        n = experts.num_local_experts
        want_out = _reference(w1.view(n, hidden, -1), w2.view(n, -1, hidden), x_ref, counts, probs)
        want_out.backward(grad_out.float())
        dw1, dw2 = experts.weight1.grad.view(n, hidden, -1), experts.weight2.grad.view(n, -1, hidden)
        for e, c in enumerate(counts):  # exact zeros where no token went (no empty group reaches a kernel)
            assert c or not (dw1[e].any() or dw2[e].any()), e
        want = (want_out.detach(), x_ref.grad, w1.grad, w2.grad)
        for name, g, w in zip(("out", "dx", "dw1", "dw2"), got, want, strict=True):
            scale = w.abs().max().item()
            err = (g.float() - w).abs().max().item()
            assert err <= 2e-2 * max(scale, 1e-6), (name, counts, err, scale)
