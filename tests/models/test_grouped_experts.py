"""Grouped experts (``model.moe_experts=grouped``: ``r1mega.models.grouped_experts.TorchGroupedMLP``) compute what
megatron-core's SequentialMLP computes, from the same checkpoint, and the setting resolves and refuses as it says."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from r1mega.checkpoint.weights import load_weights, save_weights
from r1mega.config.errors import ConfigError
from r1mega.config.load import compose_config
from r1mega.config.validate import Accelerator, moe_experts, validate
from r1mega.models.builder import build_model, transformer_config, unwrap
from r1mega.models.grouped_experts import TorchGroupedMLP, aligned_groups
from r1mega.parallel.bootstrap import single_process

CPU = Accelerator(cuda=False, transformer_engine=False)
HOPPER = Accelerator(cuda=True, transformer_engine=False, grouped_gemm=True)
AMPERE = Accelerator(cuda=True, transformer_engine=False)
TE = Accelerator(cuda=True, transformer_engine=True)


def test_aligned_groups_by_hand() -> None:
    """Counts 3, 0, 9, 1 at 4-row alignment: groups of 4, 4 (no group is empty), 12 and the rest, starting at 0,
    4, 8, 20; the buffer holds 13 rows rounded up to 16, plus 4 x 4."""
    offs, dest, total = aligned_groups(torch.tensor([3, 0, 9, 1]), 13, 4)
    assert total == 32
    assert offs.dtype == torch.int32 and offs.tolist() == [4, 8, 20, 32]
    assert dest.tolist() == [0, 1, 2, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20]


@pytest.mark.parametrize("align", [1, 4, 8])
def test_aligned_groups_keep_each_expert_s_rows_together_at_aligned_starts(align: int) -> None:
    gen = torch.Generator().manual_seed(align)
    for experts in (1, 3, 16):
        for _ in range(20):
            counts = torch.randint(0, 12, (experts,), generator=gen) * torch.randint(0, 2, (experts,), generator=gen)
            rows = int(counts.sum())
            offs, dest, total = aligned_groups(counts, rows, align)
            starts = torch.cat([offs.new_zeros(1), offs[:-1]]).long()
            sizes = offs.long() - starts
            assert total % align == 0 and offs[-1] == total and (starts % align == 0).all()
            assert (sizes >= counts).all() and (sizes >= align).all()  # each group holds its rows; none is empty
            assert dest.unique().numel() == rows and (dest < total).all()
            expert_of_row = torch.repeat_interleave(torch.arange(experts), counts)
            assert ((dest >= starts[expert_of_row]) & (dest < starts[expert_of_row] + counts[expert_of_row])).all()
            assert (dest.diff() > 0).all() if rows > 1 else True  # in order


def _models(overrides: list[str]) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """The default MoE model with sequential and with grouped experts (different random weights)."""
    built = []
    for kind in ("sequential", "grouped"):
        cfg = compose_config([f"model.moe_experts={kind}", *overrides])
        built.append(build_model(cfg, transformer_config(cfg)))
    return built[0], built[1]


def _loss_and_grads(chunks: list[torch.nn.Module], tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Per-token losses and every gradient, the routed experts' as (expert, out, in) like a checkpoint's."""
    model = unwrap(chunks[0])
    model.zero_grad()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    loss = model(tokens, positions, None, labels=tokens)
    loss.float().mean().backward()
    grads = {}
    for name, module in model.named_modules():
        if isinstance(module, TorchGroupedMLP):
            count, hidden = module.num_local_experts, module.config.hidden_size
            grads[f"{name}.fc1"] = module.weight1.grad.view(count, hidden, -1).transpose(1, 2)
            grads[f"{name}.fc2"] = module.weight2.grad.view(count, -1, hidden).transpose(1, 2)
        elif hasattr(module, "local_experts"):
            grads[f"{name}.fc1"] = torch.stack([e.linear_fc1.weight.grad for e in module.local_experts])
            grads[f"{name}.fc2"] = torch.stack([e.linear_fc2.weight.grad for e in module.local_experts])
    for name, p in model.named_parameters():
        if ".experts." not in name or "shared_experts" in name:
            grads[name] = p.grad
    return loss.detach(), grads


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_grouped_experts_compute_what_sequential_experts_compute(tmp_path: Path, dtype: str) -> None:
    """The same weights, through the distributed checkpoint both ways (sequential -> grouped, then grouped ->
    sequential), give the same losses and gradients: the routed experts', the router's and every other one."""
    overrides = [f"precision.dtype={dtype}", "model.init_method_std=0.2"]
    with single_process(compose_config(overrides)):
        sequential, grouped = _models(overrides)
        assert any(isinstance(m, TorchGroupedMLP) for m in unwrap(grouped[0]).modules())
        assert not any(isinstance(m, TorchGroupedMLP) for m in unwrap(sequential[0]).modules())
        save_weights(sequential, str(tmp_path / "sequential"))
        load_weights(grouped, str(tmp_path / "sequential"))
        save_weights(grouped, str(tmp_path / "grouped"))
        torch.manual_seed(1)
        for p in unwrap(sequential[0]).parameters():
            p.data.normal_()  # the next load must restore every tensor
        load_weights(sequential, str(tmp_path / "grouped"))
        tokens = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(0))
        loss_s, grads_s = _loss_and_grads(sequential, tokens)
        loss_g, grads_g = _loss_and_grads(grouped, tokens)
        tol = 1e-6 if dtype == "fp32" else 1e-2
        assert torch.allclose(loss_g.float(), loss_s.float(), rtol=tol, atol=tol)
        assert grads_s.keys() == grads_g.keys() and sum(".fc1" in k for k in grads_s) == 4  # 3 layers + MTP
        for key, want in grads_s.items():
            got = grads_g[key]
            assert got.shape == want.shape, key
            scale = want.float().abs().max().item()
            assert scale > 0 or key.endswith("fc2"), key
            assert (got.float() - want.float()).abs().max().item() <= tol * max(scale, 1e-12), key


def test_experts_without_tokens_still_get_zero_gradients() -> None:
    """An EP rank can receive no tokens: the layer still returns (0, hidden) and gives its weights a gradient
    (zeros), so the gradient buffers and the optimizer see every parameter."""
    cfg = compose_config(["model.moe_experts=grouped"])
    with single_process(cfg):
        model = build_model(cfg, transformer_config(cfg))[0]
        experts = next(m for m in unwrap(model).modules() if isinstance(m, TorchGroupedMLP))
        hidden = experts.config.hidden_size
        x = torch.zeros(0, hidden, requires_grad=True)
        out, bias = experts(x, torch.zeros(experts.num_local_experts, dtype=torch.long), torch.zeros(0))
        assert out.shape == (0, hidden) and bias is None
        out.sum().backward()
        assert torch.equal(experts.weight1.grad, torch.zeros_like(experts.weight1))
        assert torch.equal(experts.weight2.grad, torch.zeros_like(experts.weight2))


def test_configurations_the_layer_does_not_implement_are_refused_when_built() -> None:
    """megatron-core options r1mega's configs never set: the activation recomputed (validation refuses it without
    TE) and the routing probabilities applied before the experts."""
    cfg = compose_config(["model.moe_experts=grouped"])
    with single_process(cfg):
        model = build_model(cfg, transformer_config(cfg))[0]
        experts = next(m for m in unwrap(model).modules() if isinstance(m, TorchGroupedMLP))
        for change, message in (
            ({"recompute_granularity": "selective", "recompute_modules": ["moe_act"]}, "moe_act recompute"),
            ({"moe_apply_probs_on_input": True, "moe_router_topk": 1}, "after the activation"),
        ):
            config = copy.copy(experts.config)
            for key, value in change.items():
                setattr(config, key, value)
            with pytest.raises(ValueError, match=message):
                TorchGroupedMLP(experts.num_local_experts, config, unwrap(model).pg_collection)


def test_moe_experts_auto_resolves_by_machine_and_precision() -> None:
    def resolved(accel: Accelerator, *overrides: str) -> str | None:
        return moe_experts(compose_config(list(overrides)), accel)

    assert resolved(CPU) == "sequential"
    assert resolved(CPU, "model.moe_experts=grouped") == "grouped"
    assert resolved(HOPPER, "precision.dtype=bf16") == "grouped"
    assert resolved(HOPPER, "precision.dtype=fp32") == "sequential"
    assert resolved(HOPPER, "precision.dtype=bf16", "model.moe_ffn_hidden_size=36") == "sequential"  # 72 B rows
    assert resolved(HOPPER, "precision=fp8") == "sequential"  # the torch FP8 linears are per expert
    assert resolved(AMPERE, "precision.dtype=bf16") == "sequential"
    assert resolved(TE, "precision.dtype=bf16") == "grouped"  # TEGroupedMLP
    assert resolved(HOPPER, "precision.dtype=bf16", "model.moe_experts=sequential") == "sequential"
    assert resolved(HOPPER, "model=qwen2_tiny") is None


@pytest.mark.parametrize(
    ("accel", "overrides", "fix"),
    [
        (CPU, ["precision=fp8"], "with precision.fp8_backend=torch"),
        (HOPPER, ["precision.dtype=fp32"], "precision.dtype=fp32 on a GPU"),
        (AMPERE, ["precision.dtype=bf16"], "needs sm_90+"),
        (CPU, ["model.moe_ffn_hidden_size=30"], "model.moe_ffn_hidden_size / parallel.etp = 30 is not a multiple of 4"),
        (CPU, ["parallel.recompute_granularity=selective", "parallel.recompute_modules=[moe_act]"], "moe_act"),
    ],
)
def test_grouped_experts_are_refused_where_they_cannot_run(accel: Accelerator, overrides: list[str], fix: str) -> None:
    cfg = compose_config(["model.moe_experts=grouped", "parallel.world_size=1", *overrides])
    with pytest.raises(ConfigError, match="model.moe_experts|parallel.recompute_modules") as e:
        validate(cfg, 1, accel)
    assert fix in str(e.value), str(e.value)
