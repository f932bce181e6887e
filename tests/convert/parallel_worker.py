"""One rank of the multi-process converter tests (run by tests/convert/test_parallel.py via ``run_ranks``).

python parallel_worker.py save OUT LAYOUT [model overrides...]
    builds the model in the ``parallel`` preset LAYOUT (random weights, a random expert bias), saves its
    weights to OUT/ckpt and, on rank 0, the main head's logits on fixed tokens to OUT/logits.pt
python parallel_worker.py import OUT LAYOUT HF_DIR
    imports HF_DIR into OUT/ckpt with every rank writing its own shards of LAYOUT
"""

import os
import sys

import torch

TOKENS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))


def save(out: str, layout: str, overrides: list[str]) -> None:
    from r1mega.checkpoint.weights import save_weights
    from r1mega.config.load import compose_config
    from r1mega.models.builder import build_model
    from r1mega.parallel import bootstrap

    cfg = compose_config([*overrides, f"parallel={layout}", "parallel.world_size=null", "precision=fp32"])
    ctx = bootstrap.initialize(cfg)
    try:
        chunks = build_model(cfg)
        model = chunks[0]
        torch.manual_seed(123)  # the same bias on every rank (the router is replicated)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name.endswith("expert_bias"):
                    buffer.normal_(0, 0.1)
        save_weights(chunks, os.path.join(out, "ckpt"))
        heads = []
        hook = model.output_layer.register_forward_hook(lambda m, a, o: heads.append(o[0].clone()))
        model.eval()
        with torch.no_grad():
            labels = TOKENS if cfg.model.mtp_num_layers else None
            positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
            model(TOKENS, positions, None, labels=labels, runtime_gather_output=True)
        hook.remove()
        if ctx.is_main:
            torch.save(
                {"tokens": TOKENS, "logits": heads[-1].transpose(0, 1).contiguous()}, os.path.join(out, "logits.pt")
            )
    finally:
        bootstrap.destroy()


def main() -> None:
    mode, out, layout, *rest = sys.argv[1:]
    if mode == "save":
        save(out, layout, rest)
    else:
        from r1mega.convert.convert import import_hf

        import_hf(rest[0], os.path.join(out, "ckpt"), [f"parallel={layout}", "parallel.world_size=null"])


if __name__ == "__main__":
    main()
