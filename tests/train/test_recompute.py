"""Activation recompute (``parallel.recompute_*``): the same loss and gradients, less memory held for backward.

Activation memory is measured exactly: the bytes of every tensor autograd saves for the backward pass (weights
excluded), counted by a ``saved_tensors_hooks`` pack hook during the forward. Recomputed regions run their
forward under ``no_grad`` and save only their inputs, so the count drops by what they would have kept.
"""

from __future__ import annotations

import pytest
import torch

from r1mega.config.load import compose_config
from r1mega.models.builder import build_model, transformer_config
from r1mega.parallel.bootstrap import single_process

SEQ = 64
MODES = {
    "selective": ["parallel.recompute_granularity=selective"],
    "selective_mla": [
        "parallel.recompute_granularity=selective",
        "parallel.recompute_modules=[core_attn,mla_up_proj]",
    ],
    "full_uniform": [
        "parallel.recompute_granularity=full",
        "parallel.recompute_method=uniform",
        "parallel.recompute_num_layers=1",
    ],
    "full_block": [
        "parallel.recompute_granularity=full",
        "parallel.recompute_method=block",
        "parallel.recompute_num_layers=2",
    ],
}


def _step(overrides: list[str]) -> tuple[float, dict[str, torch.Tensor], int]:
    """(loss, gradients, bytes saved for backward) of one forward-backward of a fixed batch, fixed init."""
    cfg = compose_config(["precision=fp32", *overrides])
    with single_process(cfg):
        config = transformer_config(cfg)
        torch.manual_seed(0)
        model = build_model(cfg, config)[0]
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, SEQ), generator=g)
        positions = torch.arange(SEQ)[None].expand(2, SEQ)
        weights = {p.data_ptr() for p in model.parameters()}
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            if t.data_ptr() not in weights:
                saved += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return float(loss), grads, saved


@pytest.mark.parametrize("model", ["dsv3_tiny", "qwen2_tiny"])
def test_recompute_keeps_gradients_and_saves_activation_memory(model: str) -> None:
    base_loss, base_grads, base_saved = _step([f"model={model}"])
    for mode, overrides in MODES.items():
        if mode == "selective_mla" and model != "dsv3_tiny":
            continue
        loss, grads, saved = _step([f"model={model}", *overrides])
        print(f"{model} {mode}: saved for backward {saved / 2**20:.2f} MiB vs {base_saved / 2**20:.2f} MiB")
        assert loss == base_loss, (mode, loss, base_loss)
        assert grads.keys() == base_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, base_grads[name], rtol=1e-6, atol=1e-7, msg=f"{mode}: {name}")
        assert saved < base_saved, (mode, saved, base_saved)
        if mode == "full_uniform":  # every layer recomputed: each keeps only its input
            assert saved < 0.5 * base_saved, (mode, saved, base_saved)


def test_recompute_config_errors_name_the_key() -> None:
    from r1mega.config.errors import ConfigError
    from r1mega.config.validate import Accelerator, validate

    cases = [
        (["parallel.recompute_granularity=full"], "parallel.recompute_method"),
        (["parallel.recompute_granularity=everything"], "parallel.recompute_granularity"),
        (["parallel.recompute_num_layers=2"], "parallel.recompute_num_layers"),
        (MODES["full_uniform"][:2] + ["parallel.recompute_num_layers=9"], "parallel.recompute_num_layers"),
        (
            [
                "model=qwen2_tiny",
                "parallel.recompute_granularity=selective",
                "parallel.recompute_modules=[mla_up_proj]",
            ],
            "parallel.recompute_modules",
        ),  # fmt: skip
        (
            ["parallel.recompute_granularity=selective", "parallel.recompute_modules=[layernorm]"],
            "parallel.recompute_modules",  # megatron-core 0.16.1 recomputes norms only with TE
        ),
    ]
    for overrides, key in cases:
        with pytest.raises(ConfigError) as info:
            validate(compose_config(overrides), 1, accel=Accelerator(cuda=False, transformer_engine=False))
        assert str(info.value).startswith(f"{key}="), (overrides, str(info.value))
