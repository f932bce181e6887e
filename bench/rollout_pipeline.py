"""Rollout under pipeline parallelism: row groups in flight against one group, one process, and the matmul floor.

Decoding in the training layout with one row group leaves all stages but one idle at every token; with ``G`` row
groups in flight (``RolloutEngine(row_groups=G)``, ``grpo.rollout_row_groups``) the stages work on different
groups at once. This script measures what that buys on this machine, in one run, on the same weights:

- **one process**: the whole model on one rank (PP=1, one group), one thread;
- **PP2, G groups**: two gloo ranks (one thread each) for each ``--row-groups`` value; 1 is one group;
- **ideal PP2**: twice the one-process throughput (two ranks that split the work perfectly and never wait);
- **floor**: twice the decode step's weight matmuls alone on one thread (``rollout_floor.MatmulFloor``).

Every side samples the same prompts (``--batch`` prompts of 16-48 tokens, ``--new-tokens`` each, end-of-sequence
ignored so every side does the same work); greedy tokens are checked to be equal across sides first. The sides
alternate over ``--rounds`` and medians are reported. Each rank uses one thread: run it on a machine with at least
two free cores (the load average is printed).

Example::

    python bench/rollout_pipeline.py                                    # qwen2-shaped, hidden 512, 8 layers
    python bench/rollout_pipeline.py --hidden 64 --layers 2 --ffn 128 --vocab 256 --batch 4 --new-tokens 4 \\
        --rounds 1 --row-groups 1,2                                     # the smoke test's size
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rollout_floor import MatmulFloor  # bench/ is on the path when this file runs as a script

MODEL = [
    "model=qwen2_tiny",
    "model.num_layers={layers}",
    "model.hidden_size={hidden}",
    "model.ffn_hidden_size={ffn}",
    "model.num_attention_heads=8",
    "model.num_query_groups=2",
    "model.vocab_size={vocab}",
    "model.init_method_std=0.2",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--row-groups", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", nargs=2, metavar=("LAYOUT", "DIR"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _prompts(batch: int, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(16, 48))] for _ in range(batch)]


def worker(args: argparse.Namespace, layout: str, out: Path) -> None:
    """One rank: build the model (the one-process run saves its weights, PP2 loads them), check greedy tokens, then
    time each side over the rounds; rank 0 writes ``{layout}.json``."""
    import torch

    from r1mega.checkpoint.weights import load_weights, save_weights
    from r1mega.config.load import compose_config
    from r1mega.models.builder import build_model
    from r1mega.parallel.bootstrap import destroy, initialize
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.sampling import SamplingParams

    torch.set_num_threads(1)
    overrides = [o.format(**vars(args)) for o in MODEL]
    overrides += ["parallel=pp2"] if layout == "pp2" else ["parallel=single"]
    cfg = compose_config(overrides)
    ctx = initialize(cfg)
    torch.manual_seed(0)
    chunks = build_model(cfg)
    (save_weights if layout == "single" else load_weights)(chunks, str(out / "weights"))
    prompts = _prompts(args.batch, args.vocab)
    sides = [1] if layout == "single" else args.row_groups
    engines = {g: RolloutEngine(chunks, groups=ctx.groups, row_groups=g) for g in sides}
    greedy = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    tokens = {g: [o.token_ids for o in e.generate(prompts, greedy)] for g, e in engines.items()}
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=args.new_tokens, ignore_eos=True, seed=1)
    floor = MatmulFloor(chunks[0], args.batch) if layout == "single" else None
    tok_s: dict[int, list[float]] = {g: [] for g in sides}
    for _ in range(args.rounds):
        for g, engine in engines.items():
            torch.distributed.barrier()
            t0 = time.perf_counter()
            outs = engine.generate(prompts, params)
            torch.distributed.barrier()
            tok_s[g].append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0))
        if floor is not None:
            floor.time()
    if torch.distributed.get_rank() == 0:
        result: dict[str, Any] = {"tokens": tokens, "tok_s": {g: statistics.median(v) for g, v in tok_s.items()}}
        if floor is not None:
            result["floor_tok_s"] = floor.tok_s
        (out / f"{layout}.json").write_text(json.dumps(result))
    destroy()


def _launch(layout: str, world: int, out: Path, argv: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")  # fmt: skip
        cmd = [sys.executable, __file__, *argv, "--worker", layout, str(out)]
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{layout}: ranks exited with {codes}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args, args.worker[0], Path(args.worker[1]))
        return
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="r1mega-bench-pp-") as tmp:
        out = Path(tmp)
        _launch("single", 1, out, argv)  # the ranks ignore --json
        _launch("pp2", 2, out, argv)
        single, pp2 = (json.loads((out / f"{name}.json").read_text()) for name in ("single", "pp2"))
    ref = single["tokens"]["1"]
    for g, toks in pp2["tokens"].items():
        if toks != ref:
            raise SystemExit(f"PP2 with {g} row groups decoded other greedy tokens than one process")
    one = single["tok_s"]["1"]
    ideal, floor = 2 * one, 2 * single["floor_tok_s"]
    base = pp2["tok_s"]["1"]
    print(
        f"qwen2-shaped, hidden {args.hidden}, {args.layers} layers, batch {args.batch}, {args.new_tokens} new tokens;"
    )
    print(f"one thread per rank; medians of {args.rounds} rounds; load average {load:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after; greedy tokens equal on every side\n")  # fmt: skip
    print("| side | tok/s | vs PP2, 1 group | of ideal PP2 (2 x one process) | of floor (2 x matmuls) |")
    print("|---|---|---|---|---|")
    rows = [("one process", one)] + [
        (f"PP2, {g} row group{'s' if g != '1' else ''}", v) for g, v in pp2["tok_s"].items()
    ]
    for name, v in rows:
        print(f"| {name} | {v:.0f} | {v / base:.2f} | {v / ideal:.2f} | {v / floor:.2f} |")
    print(f"| ideal PP2 | {ideal:.0f} | {ideal / base:.2f} | 1.00 | {ideal / floor:.2f} |")
    print(f"| floor | {floor:.0f} | {floor / base:.2f} | | 1.00 |")
    if args.json:
        payload = {"one_process_tok_s": one, "pp2_tok_s": pp2["tok_s"], "ideal_tok_s": ideal, "floor_tok_s": floor}
        Path(args.json).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
