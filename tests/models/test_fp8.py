"""DeepSeek-V3's blockwise FP8 recipe (r1mega.models.fp8) against float64 references, on the CPU emulation path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from r1mega.config.errors import ConfigError
from r1mega.config.load import compose_config
from r1mega.config.validate import Accelerator, validate
from r1mega.models import fp8
from r1mega.models.builder import build_model, transformer_config, use_transformer_engine
from r1mega.models.forward import forward_logits
from r1mega.parallel.bootstrap import single_process

CPU = Accelerator(cuda=False, transformer_engine=False)
GPU_TE = Accelerator(cuda=True, transformer_engine=True)
E4M3_REL = 2.0**-4  # half an e4m3 ulp at 3 mantissa bits: the largest relative rounding error of a normal value


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ref_1x128(x: torch.Tensor) -> torch.Tensor:
    """float64 amax / 448 per row per 128-column tile; x (M, K) -> (M, ceil(K/128))."""
    m, k = x.shape
    kb = -(-k // 128)
    tiles = F.pad(x.double(), (0, kb * 128 - k)).view(m, kb, 128)
    return tiles.abs().amax(-1) / 448.0


@pytest.mark.parametrize("shape", [(4, 256), (200, 384), (3, 200)])
def test_quantize_1x128_scales_are_tile_amax_over_448_and_round_trip(shape: tuple[int, int]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, shape[1])
    q, s = fp8.quantize_1x128(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (shape[0], -(-shape[1] // 128))
    torch.testing.assert_close(s.double(), _ref_1x128(x), rtol=1e-6, atol=0)
    back = fp8.dequantize_1x128(q, s).double()
    # each element is within half an ulp of its scaled value, or below e4m3's subnormal step of the tile
    step = s.double().repeat_interleave(128, 1)[:, : shape[1]] * 2.0**-9
    assert ((back - x.double()).abs() <= E4M3_REL * x.double().abs() + step).all()
    assert q.float().abs().amax() == 448.0  # the tile maximum maps onto e4m3's largest value


def test_quantize_128x128_scales_are_block_amax_over_448_and_round_trip() -> None:
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    q, s = fp8.quantize_128x128(w)
    assert q.shape == w.shape and s.shape == (3, 2)
    blocks = F.pad(w.double(), (0, 56, 0, 84)).view(3, 128, 2, 128)
    torch.testing.assert_close(s.double(), blocks.abs().amax(dim=(1, 3)) / 448.0, rtol=1e-6, atol=0)
    back = fp8.dequantize_128x128(q, s).double()
    step = s.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200] * 2.0**-9
    assert ((back - w.double()).abs() <= E4M3_REL * w.double().abs() + step).all()
    # blocks are transpose-safe: quantising w.T gives the transposed codes and scales
    qt, st = fp8.quantize_128x128(w.t())
    assert torch.equal(qt.float(), q.t().float()) and torch.equal(st, s.t())


def test_zero_tiles_get_scale_one_and_zero_codes() -> None:
    x = torch.zeros(2, 256)
    x[0, 128:] = torch.arange(128.0)
    q, s = fp8.quantize_1x128(x)
    assert s[0, 0] == 1 and s[1].eq(1).all() and s[0, 1] == pytest.approx(127 / 448)
    assert q[:, :128].float().eq(0).all() and q[1].float().eq(0).all()
    wq, ws = fp8.quantize_128x128(torch.zeros(128, 256))
    assert ws.eq(1).all() and wq.float().eq(0).all()


def _linear_case(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 256, generator=g).to(torch.bfloat16)
    w = (torch.randn(384, 256, generator=g) * 0.05).to(torch.bfloat16)
    dy = torch.randn(m, 384, generator=g).to(torch.bfloat16)
    return x, w, dy


@pytest.mark.parametrize("m", [256, 200])
def test_fp8_linear_matches_float64_maths_of_the_quantised_operands(m: int) -> None:
    x, w, dy = _linear_case(m)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8.fp8_blockwise_linear(xr, wr)
    y.backward(dy)
    assert y.dtype == torch.bfloat16 and xr.grad.dtype == torch.bfloat16 and wr.grad.dtype == torch.bfloat16

    def dq1(t: torch.Tensor) -> torch.Tensor:
        return fp8.dequantize_1x128(*fp8.quantize_1x128(t)).double()

    w_dq = fp8.dequantize_128x128(*fp8.quantize_128x128(w)).double()
    want_y = dq1(x) @ w_dq.t()  # forward: x in 1x128 tiles, w in 128x128 blocks
    want_dx = dq1(dy) @ w_dq  # dgrad: dy in 1x128 tiles along N, the same w blocks
    want_dw = dq1(dy.t()) @ dq1(x.t()).t()  # wgrad: both in tiles along the token dim
    # tight: only the fp32 accumulation and the bf16 output rounding differ from the float64 maths
    assert _rel(y, want_y) < 4e-3 and _rel(xr.grad, want_dx) < 4e-3 and _rel(wr.grad, want_dw) < 4e-3
    # loose: FP8 against the unquantised product, a few per cent in relative norm
    exact_w = w.double()
    assert _rel(y, x.double() @ exact_w.t()) < 0.06
    assert _rel(xr.grad, dy.double() @ exact_w) < 0.06
    assert _rel(wr.grad, dy.double().t() @ x.double()) < 0.06


def test_fp8_linear_takes_3d_input_and_empty_experts() -> None:
    x, w, _ = _linear_case(256)
    y = fp8.fp8_blockwise_linear(x.view(16, 16, 256), w)
    assert y.shape == (16, 16, 384)
    empty = torch.zeros(0, 256, dtype=torch.bfloat16, requires_grad=True)
    assert fp8.fp8_blockwise_linear(empty, w).shape == (0, 384)


def test_gemm_path_without_cuda_is_emulation() -> None:
    if torch.cuda.is_available():
        pytest.skip("the GPU path is tested in tests/gpu/test_fp8_gpu.py")
    assert fp8.fp8_gemm_path() == "emulation"


TINY = [
    "model=dsv3_tiny",
    "model.hidden_size=128",
    "model.ffn_hidden_size=256",
    "model.moe_ffn_hidden_size=128",
    "model.moe_shared_expert_intermediate_size=128",
    "model.q_lora_rank=128",
    "model.kv_lora_rank=128",
    "model.qk_head_dim=32",
    "model.qk_pos_emb_head_dim=32",
    "model.v_head_dim=32",
    "model.num_layers=2",
    "data.seq_length=64",
]


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = forward_logits(model, tokens[:, :-1]).float()  # (b, s, V)
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def test_tiny_dsv3_in_fp8_trains_like_bf16() -> None:
    cfg8 = compose_config([*TINY, "precision=fp8", "precision.fp8_backend=torch"])
    cfg16 = compose_config([*TINY, "precision=bf16"])
    validate(cfg8, world_size=1, accel=CPU)
    assert not use_transformer_engine(cfg8)
    tokens = torch.randint(0, 2048, (2, 65), generator=torch.Generator().manual_seed(0))
    with single_process(cfg16):
        config8 = transformer_config(cfg8)
        assert config8.fp8 is None  # the torch backend must not switch megatron onto TE
        (bf16,) = build_model(cfg16)
        (model8,) = build_model(cfg8, config8)
        model8.load_state_dict(bf16.state_dict())
        fp8_layers = [n for n, mod in model8.named_modules() if getattr(mod, "fp8", False)]
        kinds = {n.split(".")[-1] for n in fp8_layers}
        assert {"linear_fc1", "linear_fc2", "linear_q_up_proj", "linear_kv_up_proj", "linear_proj"} <= kinds
        assert any(".experts." in n for n in fp8_layers) and any("shared_experts" in n for n in fp8_layers)
        assert "router" not in kinds and not getattr(model8.output_layer, "fp8", False)
        losses, grads = [], []
        for model in (bf16, model8):
            model.zero_grad()
            loss = _loss(model, tokens)
            loss.backward()
            losses.append(loss.item())
            grads.append(torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None]))
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
    assert _rel(grads[1], grads[0]) < 0.15


def test_torch_fp8_backend_config_errors_are_one_line() -> None:
    cases = [
        (["precision=fp8", "precision.fp8_backend=torch", "precision.transformer_impl=transformer_engine"], GPU_TE),
        (["precision=fp8", "precision.fp8_backend=torch", "precision.fp8_recipe=delayed"], CPU),
        (["precision=fp8", "precision.fp8_backend=torch", "precision.fp8=hybrid"], CPU),
        (["precision=fp8", "precision.fp8_backend=te"], CPU),
    ]
    keys = ["precision.transformer_impl", "precision.fp8_recipe", "precision.fp8", "precision.fp8_backend"]
    for (overrides, accel), key in zip(cases, keys, strict=True):
        with pytest.raises(ConfigError) as info:
            validate(compose_config(overrides), world_size=1, accel=accel)
        message = str(info.value)
        assert message.startswith(f"{key}=") and "\n" not in message, message
    with pytest.raises(ConfigError, match=r"^precision\.fp8_backend='tensorrt' is invalid"):
        compose_config(["precision=fp8", "precision.fp8_backend=tensorrt"])


def test_fp8_preset_picks_te_with_te_and_torch_without() -> None:
    from r1mega.config.validate import fp8_backend

    cfg = compose_config(["precision=fp8"])
    assert fp8_backend(cfg, GPU_TE) == "te" and fp8_backend(cfg, CPU) == "torch"
    validate(cfg, world_size=1, accel=CPU)
    validate(cfg, world_size=1, accel=GPU_TE)


@pytest.mark.parametrize(
    ("fused", "shape", "dtype"),
    [
        ("fused_quantize_1x128", (200, 384), torch.bfloat16),
        ("fused_quantize_1x128", (3, 200), torch.float32),
        ("fused_quantize_128x128", (300, 200), torch.bfloat16),
    ],
)
def test_fused_quantisation_gives_the_eager_codes_and_scales(
    fused: str, shape: tuple[int, int], dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled quantisers (what CUDA tensors take: one fused kernel instead of ~10) compute the eager
    function's e4m3 codes and scales bit for bit, across two shapes of the one dynamic-shape compile. Compiled
    here on the CPU (inductor's C++ backend); on a GPU the same graph goes to Triton (``tests/gpu``)."""
    quantizer = getattr(fp8, fused)
    gen = torch.Generator().manual_seed(3)
    with torch.compiler.set_stance("default"):  # CPU processes run torch.compile eagerly (bootstrap)
        for rows in (shape[0], shape[0] + 37):
            x = (torch.randn(rows, shape[1], generator=gen) * torch.logspace(-3, 3, shape[1])).to(dtype)
            x[0, :5] = 0.0  # a partly zero tile
            q, s = quantizer.compiled(x)
            q_ref, s_ref = quantizer.fn(x)
            assert q.dtype == torch.float8_e4m3fn and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
            assert torch.equal(s, s_ref)

    def never(t: torch.Tensor) -> None:
        raise AssertionError("a CPU tensor must take the eager function")

    monkeypatch.setattr(quantizer, "compiled", never)
    assert torch.equal(quantizer(x)[1], s_ref) and quantizer.ok  # a CPU tensor takes the eager function
