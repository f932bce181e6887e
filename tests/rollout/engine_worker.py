"""One rank of a rollout run: greedy and seeded sampling (one batch, and in row groups), and continuous batching,
from a fixed-seed tiny model; writes JSON.

Usage: engine_worker.py OUT_DIR MODEL LAYOUT. The single-process run saves its weights and every
other layout loads them. Under expert parallelism each rank takes its own prompts (it is a
data-parallel rank) and gets a different length limit, so ranks finish at different steps.
"""

import json
import os
import sys

import torch

from r1mega.checkpoint.weights import load_weights, save_weights
from r1mega.config.load import compose_config
from r1mega.models.builder import build_model
from r1mega.parallel.bootstrap import destroy, initialize
from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.sampling import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [100, 200, 300, 400, 500, 600, 700], [42], [7, 7, 7, 9]]
LAYOUTS = {  # layouts without a preset of their own
    "tp2pp2": ["parallel=tp2", "parallel.pipeline_model_parallel_size=2", "parallel.world_size=4"],
    "pp2vpp2": ["parallel=pp2", "parallel.virtual_pipeline_model_parallel_size=2"],
    "pp2ep2": ["parallel=pp2", "parallel.expert_model_parallel_size=2", "parallel.world_size=4"],
}
ROW_GROUPS = (1, 2, 3)
"""The engine's ``row_groups``: 1 is one batch; 2 (as many as pipeline stages) and 3 (more) are in flight together
under PP and decoded in turn on one process."""


def main(out: str, model: str, layout: str) -> None:
    parallel = LAYOUTS.get(layout, [f"parallel={layout}"])
    cfg = compose_config([f"model={model}", *parallel, "model.init_method_std=0.2"])
    ctx = initialize(cfg)
    rank = torch.distributed.get_rank()
    torch.manual_seed(1234)
    chunks = build_model(cfg)
    init = os.path.join(out, f"init-{model}")
    if layout == "single":  # the other layouts load these weights (resharded by dist-checkpointing)
        save_weights(chunks, init)
    else:
        load_weights(chunks, init)
    ep = cfg.parallel.expert_model_parallel_size
    ep_rank = torch.distributed.get_rank(ctx.groups.ep) if ep > 1 else 0
    mine = list(range(len(PROMPTS)))[ep_rank::ep] if ep > 1 else list(range(len(PROMPTS)))
    prompts = [PROMPTS[i] for i in mine]
    result = {}
    for groups in ROW_GROUPS:  # one batch, and row groups in flight (under PP; in turn on one process)
        engine = RolloutEngine(chunks, seed=7, groups=ctx.groups, row_groups=groups)
        suffix = "" if groups == 1 else f"@{groups}"
        for name, params in {
            "greedy": SamplingParams(temperature=0, max_new_tokens=10 - 3 * ep_rank),
            "sampled": SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=10 - 3 * ep_rank, seed=99),
        }.items():
            outs = engine.generate(prompts, params)
            result[name + suffix] = {str(i): [o.token_ids, o.logprobs] for i, o in zip(mine, outs, strict=True)}
        # every pipeline stage holds the same generator state
        result["generator" + suffix] = engine.generator.get_state().sum().item()
    if cfg.parallel.pipeline_model_parallel_size == 1:  # the per-row loop runs without pipeline parallelism
        # Continuous batching: two rows, per-sequence seeds; under EP ranks prefill at different steps.
        rows = RolloutEngine(chunks, groups=ctx.groups, max_batch=2)
        params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=10 - 3 * ep_rank)
        outs = rows.generate(prompts, params, seeds=[1000 + i for i in mine])
        result["continuous"] = {str(i): [o.token_ids, o.logprobs] for i, o in zip(mine, outs, strict=True)}
    with open(os.path.join(out, f"{layout}-{model}-rank{rank}.json"), "w") as f:
        json.dump(result, f)
    del ctx
    destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
