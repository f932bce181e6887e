"""Logits of one model on fixed tokens, on this process's device: ``python logits_worker.py MODEL CKPT OUT``.

Run once with ``CUDA_VISIBLE_DEVICES=""`` (the CPU) and once on the GPU, it checks that the same weights give
the same fp32 logits on both devices. Without ``CKPT`` weights (an empty folder) the model is initialised from
the seed and saved there first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from r1mega.checkpoint.weights import load_weights, save_weights
from r1mega.config.load import compose_config
from r1mega.models.builder import build_model
from r1mega.models.forward import forward_logits
from r1mega.parallel.bootstrap import single_process


def main(model: str, checkpoint: str, out: str) -> None:
    cfg = compose_config([f"model={model}", "precision=fp32"])
    with single_process(cfg) as ctx:
        chunks = build_model(cfg)
        if (Path(checkpoint) / "metadata.json").is_file():
            load_weights(chunks, checkpoint)
        else:
            save_weights(chunks, checkpoint)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
        for chunk in chunks:
            chunk.eval()
        with torch.no_grad():
            logits = forward_logits(chunks[0], tokens).float().cpu()  # (2, 48, V)
        torch.save({"logits": logits, "device": str(ctx.device)}, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
