"""One Bradley-Terry forward-backward of the tiny reward model under TP=argv[1]; prints rewards, loss and
gradients (after finalize_model_grads) as JSON, for sequence parallelism off and (TP > 1) on."""

from __future__ import annotations

import json
import sys

import torch
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from r1mega.config.load import compose_config
from r1mega.data.preferences import make_pair_batch
from r1mega.models.builder import transformer_config, unwrap
from r1mega.models.reward import build_reward_model
from r1mega.parallel.bootstrap import destroy, initialize
from r1mega.stages.reward_model import REPORT_KEYS, rm_forward_step
from r1mega.train.step import build_trainer, forward_backward


def run(tp: int, sp: str, ctx: object | None) -> tuple[dict, object]:
    cfg = compose_config(
        [
            "model=qwen2_tiny",
            "stage=reward_model",
            "data=cold_start",
            "data.seq_length=32",
            f"parallel.tensor_model_parallel_size={tp}",
            "parallel.world_size=null",
            f"parallel.sequence_parallel={sp}",
            "optim.micro_batch_size=2",
            "optim.global_batch_size=2",
        ]
    )
    ctx = ctx or initialize(cfg)
    model_parallel_cuda_manual_seed(cfg.seed)  # the same weights for every layout (CPU initialisation)
    torch.manual_seed(cfg.seed)
    config = transformer_config(cfg)  # the model alone: this worker reads no preference data
    trainer = build_trainer(cfg, config, build_reward_model(cfg, config), ctx.data_parallel_size)
    g = torch.Generator().manual_seed(3)
    pairs = [tuple(torch.randint(10, 2000, (n,), generator=g).tolist() for n in ns) for ns in ((13, 9), (16, 11))]
    batch = make_pair_batch(pairs, pad_id=2, multiple_of=tp if sp == "true" else 1)
    seen: dict[str, torch.Tensor] = {}

    def forward_step(data_iterator, model):  # noqa: ANN001, ANN202
        values, loss_fn = rm_forward_step(data_iterator, model)
        seen["rewards"] = values.detach()[torch.arange(4), batch["last"]]
        return values, loss_fn

    metrics = forward_backward(trainer, iter([batch]), forward_step, keys=REPORT_KEYS, num_microbatches=1)
    rm = unwrap(trainer.model[0])
    return {
        "values": seen["rewards"].tolist(),
        "loss": metrics["rm_loss"],
        "head_grad": rm.value_head.weight.main_grad.tolist(),
        "bias_grad": rm.value_head.bias.main_grad.tolist(),
        "norm_grad": rm.decoder.final_layernorm.weight.main_grad.tolist(),
    }, ctx


def main() -> None:
    tp = int(sys.argv[1])
    results, ctx = {}, None
    try:
        for sp in ("false", "true") if tp > 1 else ("false",):
            results[sp], ctx = run(tp, sp, ctx)
    finally:
        destroy()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
