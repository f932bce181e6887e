"""One rank of the damaged-checkpoint agreement test (run by tests/checkpoint/test_manager.py).

    python integrity_worker.py OUT [overrides...]

Two ranks (TP=2: each writes its own shards) save checkpoints at step 2 and step 4 (other weights); rank 0 then flips a byte in rank 1's
shard of step 4 (``__1_*.distcp``), which only rank 1 checksums. A fresh manager's ``latest()`` must pick
step 2 on both ranks and load it. Each rank prints ``rank R resumed STEP`` for the test to compare.
"""

import sys
from pathlib import Path

import torch.distributed as dist

from r1mega.checkpoint import integrity
from r1mega.checkpoint.manager import CheckpointManager
from r1mega.checkpoint.weights import map_parameters
from r1mega.config.load import compose_config
from r1mega.data.synthetic import synthetic_microbatches
from r1mega.models.builder import build_model, transformer_config
from r1mega.parallel import bootstrap
from r1mega.train.step import build_trainer, train_step


def main(out: str, overrides: list[str]) -> None:
    cfg = compose_config(
        ["model=llama_tiny", "parallel=tp2", "data.seq_length=32", "parallel.world_size=null", *overrides]
    )
    ctx = bootstrap.initialize(cfg)
    try:
        config = transformer_config(cfg)
        trainer = build_trainer(cfg, config, build_model(cfg, config), ctx.data_parallel_size)
        batches = synthetic_microbatches(2, 32, cfg.model.vocab_size, 0, ctx.dp_rank, ctx.data_parallel_size, 0)
        train_step(trainer, batches)
        manager = CheckpointManager(cfg, str(Path(out) / "ckpt"))
        manager.save(2, trainer, {})
        map_parameters(trainer.model, lambda name, p: p + 1)
        step4 = manager.save(4, trainer, {})
        shard = sorted(step4.glob("__1_*.distcp"))[0]
        if dist.get_rank() == 0:
            assert integrity.owner(shard.name, dist.get_world_size()) == 1, shard
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(bytes(data))
        dist.barrier()
        fresh = CheckpointManager(cfg, str(Path(out) / "ckpt"))
        latest = fresh.latest()
        step, _ = fresh.load(latest, trainer)
        print(f"rank {dist.get_rank()} resumed {latest.name} at step {step}", flush=True)
    finally:
        bootstrap.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
