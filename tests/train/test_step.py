"""The training step on real megatron-core: the tiny MoE + MLA model learns; non-finite steps are skipped."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.config.load import compose_config
from r1mega.data.synthetic import synthetic_batch
from r1mega.models.builder import build_model, transformer_config, unwrap
from r1mega.parallel.bootstrap import single_process
from r1mega.train.step import build_trainer, lm_forward_step, train_step


def _fixed_batches(cfg, n: int):
    batch = synthetic_batch(cfg.optim.micro_batch_size, cfg.data.seq_length, cfg.model.vocab_size, seed=7)
    return iter([batch] * n)


@pytest.mark.parametrize(
    ("overrides", "steps"),
    [
        (["precision=fp32"], 30),
        (["precision=bf16"], 20),
        (["model=qwen2_tiny"], 20),
        (["model=llama_tiny"], 20),
    ],
)
def test_loss_falls_on_a_fixed_batch(overrides: list[str], steps: int) -> None:
    cfg = compose_config([*overrides, "optim.lr=3e-3", f"optim.train_steps={steps}", "data.seq_length=32"])
    with single_process(cfg):
        config = transformer_config(cfg)
        trainer = build_trainer(cfg, config, build_model(cfg, config), 1)
        losses = [train_step(trainer, _fixed_batches(cfg, trainer.num_microbatches))["lm_loss"] for _ in range(steps)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def test_non_finite_loss_skips_the_update() -> None:
    cfg = compose_config(["optim.train_steps=3", "optim.lr_warmup_steps=0", "data.seq_length=16"])
    with single_process(cfg):
        config = transformer_config(cfg)
        trainer = build_trainer(cfg, config, build_model(cfg, config), 1)
        before = {k: v.clone() for k, v in unwrap(trainer.model[0]).state_dict().items() if torch.is_tensor(v)}

        def poisoned_step(data_iterator, model):
            output, loss_fn = lm_forward_step(data_iterator, model)
            return output * float("nan"), loss_fn

        metrics = train_step(trainer, _fixed_batches(cfg, trainer.num_microbatches), poisoned_step)
        after = unwrap(trainer.model[0]).state_dict()
        assert metrics["skipped"] == 1.0 and math.isnan(metrics["lm_loss"])
        assert all(torch.equal(before[k], after[k]) for k in before), "weights changed on a skipped step"
        healthy = train_step(trainer, _fixed_batches(cfg, trainer.num_microbatches))
        assert healthy["skipped"] == 0.0
