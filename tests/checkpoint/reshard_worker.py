"""One link of the checkpoint-resharding chain (run by tests/checkpoint/test_reshard.py, one process per rank).

    python reshard_worker.py OUT LAYOUT SRC [overrides...]

Builds the tiny DeepSeek-V3 model (MLA + MoE + MTP) in the ``parallel`` preset LAYOUT. With SRC (not ``-``)
it resumes from the newest full training checkpoint in SRC/ckpt with ``CheckpointManager.load``: model,
optimizer and LR schedule, saved under another layout. Then it trains 3 steps and saves a full training
checkpoint after the second into OUT/ckpt (the next link's SRC).

After the load and after every step it records the logits of a fixed batch (the MTP head's and the main
head's, gathered over TP, fp32) and the step's loss: rank 0 writes OUT/trace.pt = {step: {"logits": [...],
"loss": float}}. Equal logits right after the load show the weights resharded; equal logits after the
next steps show the optimizer state (Adam moments, step) and schedule resharded too.
"""

import os
import sys

import torch

from r1mega.checkpoint.manager import CheckpointManager
from r1mega.config.load import compose_config
from r1mega.data.synthetic import synthetic_batch
from r1mega.loop import setup
from r1mega.models.builder import unwrap
from r1mega.parallel import bootstrap
from r1mega.train.step import Trainer, train_step

COMMON = [
    "model=dsv3_tiny",
    "precision=fp32",
    "optim.micro_batch_size=2",
    "optim.global_batch_size=4",
    "data.seq_length=32",
    "parallel.world_size=null",
]
STEPS = 3
SAVE_AFTER = 2


@torch.no_grad()
def logits(trainer: Trainer, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every output head's logits on ``batch``: MTP heads first, then the main head, each (b, s, vocab)."""
    model = unwrap(trainer.model[0])
    heads: list[torch.Tensor] = []
    # With MTP, GPTModel needs labels; the logits are what the output layer returns (gathered over TP).
    hook = model.output_layer.register_forward_hook(lambda module, args, out: heads.append(out[0].clone()))
    model.eval()
    try:
        model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], runtime_gather_output=True)
    finally:
        hook.remove()
        model.train()
    return [h.transpose(0, 1).float().contiguous() for h in heads]  # (s, b, v) -> (b, s, v)


def main(out: str, layout: str, src: str, overrides: list[str]) -> None:
    cfg = compose_config([*COMMON, f"parallel={layout}", *overrides])
    ctx = bootstrap.initialize(cfg)
    try:
        trainer, stage = setup(cfg, ctx)
        batch = synthetic_batch(2, cfg.data.seq_length, cfg.model.vocab_size, seed=4321)
        step = 0
        if src != "-":
            source = CheckpointManager(cfg, os.path.join(src, "ckpt"))
            step, _ = source.load(source.latest(), trainer)
        checkpoints = CheckpointManager(cfg, os.path.join(out, "ckpt"))
        trace = {step: {"logits": logits(trainer, batch), "loss": float("nan")}}
        for i in range(STEPS):
            metrics = train_step(trainer, stage.batches(step), stage.forward_step())
            step += 1
            assert not metrics["skipped"], metrics
            trace[step] = {"logits": logits(trainer, batch), "loss": metrics["lm_loss"]}
            if i + 1 == SAVE_AFTER:
                checkpoints.save(step, trainer, {})
        if ctx.is_main:
            torch.save(trace, os.path.join(out, "trace.pt"))
    finally:
        bootstrap.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
