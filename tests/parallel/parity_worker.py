"""One side of the parallel-equivalence test (run by tests/parallel/test_parity.py, one process per rank).

modes:
  reference OUT         1 process: build the model, save its weights (OUT/init), run forward-backward on
                        the fixed global batch, save loss (OUT/reference.json) and grads (OUT/reference_grads)
  parallel OUT LAYOUT   N processes: load OUT/init into LAYOUT, same forward-backward, save loss and grads
  compare OUT LAYOUT    1 process: load both grad checkpoints into one model and print the differences

Gradients are compared by writing each parameter's main_grad into the parameter and saving a
distributed checkpoint: megatron-core's sharded state dict then gathers every layout into the same
global tensors, fused and expert layouts included.
"""

import json
import os
import sys

import torch

from r1mega.checkpoint.weights import load_weights, map_parameters, save_weights
from r1mega.config.load import compose_config
from r1mega.models.builder import build_model, transformer_config, unwrap
from r1mega.parallel import bootstrap
from r1mega.stages.pretrain import PretrainStage
from r1mega.train.step import build_trainer, forward_backward

COMMON = ["optim.micro_batch_size=2", "optim.global_batch_size=4", "data.seq_length=32", "parallel.world_size=null"]


def run(mode: str, out: str, layout: str) -> None:
    cfg = compose_config([f"parallel={layout}", *COMMON] + sys.argv[4:])
    ctx = bootstrap.initialize(cfg)
    try:
        config = transformer_config(cfg)
        chunks = build_model(cfg, config)
        if mode == "compare":
            compare(chunks, out)
            return
        if mode == "parallel":
            load_weights(chunks, os.path.join(out, "init"))
        else:
            save_weights(chunks, os.path.join(out, "init"))
        trainer = build_trainer(cfg, config, chunks, ctx.data_parallel_size)
        for model in trainer.model:
            model.zero_grad_buffer()
        metrics = forward_backward(trainer, PretrainStage(cfg, ctx).batches(0))
        map_parameters(chunks, lambda name, p: p.main_grad)
        save_weights(chunks, os.path.join(out, f"{mode}_grads"))
        if ctx.is_main:
            with open(os.path.join(out, f"{mode}.json"), "w") as f:
                json.dump(metrics, f)
    finally:
        bootstrap.destroy()


def compare(chunks, out: str) -> None:
    grads = {}
    for side in ("reference", "parallel"):
        load_weights(chunks, os.path.join(out, f"{side}_grads"))
        grads[side] = {k: v.detach().clone() for k, v in unwrap(chunks[0]).state_dict().items() if torch.is_tensor(v)}
    report = {}
    for key, ref in grads["reference"].items():
        if "_extra_state" in key:
            continue
        par = grads["parallel"][key]
        report[key] = [float((ref - par).abs().max()), float(ref.abs().max())]
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    layout = sys.argv[3] if len(sys.argv) > 3 else "single"
    run(mode, out, layout)
