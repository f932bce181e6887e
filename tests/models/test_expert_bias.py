"""Aux-loss-free balancing: megatron-core's finalize_model_grads moves the expert bias, and load evens out."""

from __future__ import annotations

import pytest
import torch

from r1mega.config.load import compose_config
from r1mega.models.builder import build_model, transformer_config, unwrap
from r1mega.parallel.bootstrap import single_process
from r1mega.train.step import build_trainer, train_step

SEQ = 32


def _imbalance_per_step(enable_bias: bool, steps: int) -> tuple[list[float], torch.Tensor]:
    """Train on one skewed batch with (almost) frozen weights; return max/mean expert load per step."""
    cfg = compose_config(
        [
            "optim.lr=1e-9",
            "optim.min_lr=0",
            f"model.moe_router_enable_expert_bias={str(enable_bias).lower()}",
            "model.moe_router_bias_update_rate=4e-3",
            f"optim.train_steps={steps}",
            f"data.seq_length={SEQ}",
        ]
    )
    with single_process(cfg):
        config = transformer_config(cfg)
        trainer = build_trainer(cfg, config, build_model(cfg, config), 1)
        routers = [m for name, m in unwrap(trainer.model[0]).named_modules() if name.endswith("mlp.router")]
        loads: list[torch.Tensor] = []
        for router in routers:  # routing_map (tokens, experts) is the router's second output
            router.register_forward_hook(lambda mod, inp, out: loads.append(out[1].sum(0).float()))
        tokens = torch.randint(0, 16, (2, SEQ), generator=torch.Generator().manual_seed(0))  # 16 of 512 tokens
        batch = {
            "tokens": tokens,
            "labels": tokens,
            "loss_mask": torch.ones(2, SEQ),
            "position_ids": torch.arange(SEQ).expand(2, -1),
        }
        history = []
        for _ in range(steps):
            loads.clear()
            train_step(trainer, iter([batch] * trainer.num_microbatches))
            history.append(sum((load.max() / load.mean()).item() for load in loads) / len(loads))
        bias = torch.stack([r.expert_bias.clone() for r in routers]) if enable_bias else torch.zeros(1)
    return history, bias


@pytest.mark.slow
def test_expert_bias_moves_and_balances_a_skewed_batch() -> None:
    """... and on a CPU megatron's torch.compile'd bias update runs eagerly (r1mega.parallel.bootstrap): no frame
    is compiled, which cost 2-4 s of inductor work per MoE process."""
    from torch._dynamo.utils import counters

    counters.clear()
    history, bias = _imbalance_per_step(enable_bias=True, steps=40)
    assert not counters["frames"], dict(counters["frames"])
    assert bias.abs().sum() > 0, "finalize_model_grads should have updated the expert bias"
    late = sum(history[-10:]) / 10
    assert late < 0.75 * history[0], f"load imbalance (max/mean) should fall: {history[0]:.2f} -> {late:.2f}"


def test_without_expert_bias_the_imbalance_stays() -> None:
    history, _ = _imbalance_per_step(enable_bias=False, steps=6)
    assert history[-1] == pytest.approx(history[0], rel=0.05), history
