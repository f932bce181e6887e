"""One optimizer step on megatron-core: wrapping, optimizer, LR schedule and forward-backward.

Model chunks are wrapped as megatron's training does (``Float16Module`` for bf16, then megatron DDP);
the optimizer is ``get_megatron_optimizer`` (optionally the distributed optimizer) and the schedule
``OptimizerParamScheduler``; the step runs megatron's forward-backward function (no pipelining,
1F1B or interleaved, chosen by the layout) and ``finalize_model_grads`` (grad all-reduce, sequence-
parallel norm grads, and the aux-loss-free expert-bias update).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from r1mega.config.schema import R1Config
from r1mega.models.builder import unwrap
from r1mega.train import multi_tensor
from r1mega.utils.device import current_device, device_batches

Batch = dict[str, torch.Tensor]
"""tokens, labels, loss_mask (b, s) and position_ids (b, s)."""


@dataclass
class Trainer:
    """The wrapped model chunks with their optimizer and schedule."""

    cfg: R1Config
    config: TransformerConfig
    model: list[DistributedDataParallel]
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    data_parallel_size: int

    @property
    def expert_biases(self) -> list[torch.Tensor]:
        """The routers' aux-loss-free balancing biases (updated by ``finalize_model_grads``)."""
        return [
            module.expert_bias
            for chunk in self.model
            for module in chunk.modules()
            if getattr(module, "expert_bias", None) is not None
        ]

    @property
    def num_microbatches(self) -> int:
        o = self.cfg.optim
        return o.global_batch_size // (o.micro_batch_size * self.data_parallel_size)


def wrap_model(
    cfg: R1Config, config: TransformerConfig, chunks: list[torch.nn.Module]
) -> list[DistributedDataParallel]:
    """Float16Module (bf16) and megatron DDP around each chunk, as megatron's ``get_model`` does."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        bucket_size=None if cfg.parallel.overlap_grad_reduce else 10**12,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        if cfg.precision.dtype == "bf16":
            chunk = Float16Module(config, chunk)
        wrapped.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=chunk,
                disable_bucketing=i > 0,  # as megatron: only the first chunk overlaps its reduce
            )
        )
    for model in wrapped:
        model.broadcast_params()  # identical weights on every data-parallel replica
    return wrapped


def build_trainer(cfg: R1Config, config: TransformerConfig, chunks: list[torch.nn.Module], dp: int) -> Trainer:
    """Wrap ``chunks`` and create the optimizer and LR schedule."""
    o = cfg.optim
    # The schedule counts optimizer updates; a GRPO step makes several.
    updates = o.train_steps * (cfg.grpo.updates_per_step if cfg.stage.name == "grpo" else 1)
    model = wrap_model(cfg, config, chunks)
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.precision.dtype == "bf16",
        params_dtype=config.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    multi_tensor.install()  # without TE/apex, megatron's grad norm reads every tensor's norm to the host
    optimizer = get_megatron_optimizer(opt_config, model)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.lr_warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_steps,
        lr_decay_steps=max(updates, 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(updates, 1),
        wd_incr_style="constant",
    )
    # What megatron's training loop sets so the schedules reduce grads and update the expert bias.
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    config.grad_sync_func = None
    return Trainer(cfg, config, model, optimizer, scheduler, dp)


def lm_loss(
    loss_mask: torch.Tensor, output: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Masked next-token loss: (sum over unmasked tokens, token count, report)."""
    losses = output.float()  # (b, s) per-token cross entropy from GPTModel
    mask = loss_mask.float()
    total = (losses * mask).sum()
    count = mask.sum()
    return total, count.to(torch.int), {"lm_loss": torch.stack([total.detach(), count.detach()])}


def lm_forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
    """The forward step megatron's schedules call once per micro-batch."""
    batch = next(data_iterator)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        None,
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    return output, partial(lm_loss, batch["loss_mask"])


def run_schedule(
    cfg: R1Config,
    chunks: Sequence[torch.nn.Module],
    batches: Iterator[Batch],
    forward_step: Callable,
    num_microbatches: int,
    forward_only: bool = False,
    seq_length: int | None = None,
    micro_batch_size: int | None = None,
) -> list[Any]:
    """megatron's forward-backward function over ``chunks`` (no pipelining, 1F1B or interleaved, as the layout
    says): what the last stage's loss functions returned. ``seq_length`` and ``micro_batch_size``: the width and
    rows of every micro-batch, which size the activations pipeline stages exchange (default ``data.seq_length``
    and ``optim.micro_batch_size``)."""
    fb = get_forward_backward_func()
    vpp = len(chunks)
    if vpp > 1:
        # The interleaved schedule takes one data iterator per model chunk and draws micro-batch k from chunk c's
        # iterator when chunk c runs micro-batch k (megatron's training builds one iterator per chunk over the
        # same data): each chunk needs its own pass over the same micro-batches, not a share of one stream.
        items = list(itertools.islice(batches, num_microbatches))  # the step's micro-batches (streams may not end)
        iterator: Any = [device_batches(items) for _ in range(vpp)]
    else:
        iterator = device_batches(batches)  # host-built micro-batches go to the device, one ahead
    return fb(
        forward_step_func=forward_step,
        data_iterator=iterator,
        model=list(chunks) if vpp > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length or cfg.data.seq_length,
        micro_batch_size=micro_batch_size or cfg.optim.micro_batch_size,
        forward_only=forward_only,
    )


def pipeline_forward_values(
    cfg: R1Config,
    chunks: Sequence[torch.nn.Module],
    batches: Iterator[Batch],
    forward: Callable[[torch.nn.Module, Batch], torch.Tensor],
    values: Callable[[Batch, torch.Tensor], torch.Tensor],
    num_microbatches: int,
    total: int,
    seq_length: int,
    micro_batch_size: int,
) -> torch.Tensor:
    """Per-micro-batch values computed on the last pipeline stage, through megatron's forward-only schedule, and
    broadcast to the whole pipeline group: every stage returns the same flat float32 tensor of ``total`` values.

    ``forward(model, batch)`` is a stage's forward (the last stage's output goes to ``values(batch, output)``, which
    returns that micro-batch's flat values).
    """
    parts: list[torch.Tensor] = []

    def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        b = next(data_iterator)
        return forward(model, b), partial(collect, b)

    def collect(b: Batch, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        parts.append(values(b, out).float())
        return out.new_zeros(()), torch.ones((), dtype=torch.int), {}

    run_schedule(cfg, chunks, batches, forward_step, num_microbatches, forward_only=True, seq_length=seq_length,
                 micro_batch_size=micro_batch_size)  # fmt: skip
    flat = torch.cat(parts) if parts else torch.empty(total, device=current_device())
    pp_group = unwrap(chunks[0]).pg_collection.pp
    last = dist.get_global_rank(pp_group, pp_group.size() - 1)
    dist.broadcast(flat, src=last, group=pp_group)
    return flat


def forward_backward(
    trainer: Trainer,
    batches: Iterator[Batch],
    forward_step: Callable = lm_forward_step,
    forward_only: bool = False,
    keys: Sequence[str] = ("lm_loss",),
    num_microbatches: int | None = None,
    seq_length: int | None = None,
    micro_batch_size: int | None = None,
) -> dict[str, float]:
    """Run all micro-batches of one global batch; returns token-mean losses over the whole world."""
    reports = run_schedule(
        trainer.cfg,
        trainer.model,
        batches,
        forward_step,
        num_microbatches or trainer.num_microbatches,
        forward_only=forward_only,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
    )
    return reduce_reports(reports, keys, unwrap(trainer.model[0]).pg_collection.tp)


def reduce_reports(
    reports: list[dict[str, torch.Tensor]], keys: Sequence[str], tp_group: dist.ProcessGroup
) -> dict[str, float]:
    """Sum each (total, count) report over micro-batches and ranks: one token mean per key, on every rank.

    Only the last pipeline stage has reports and TP ranks hold copies, so TP rank 0 of ``tp_group`` (the model's
    tensor-parallel group) contributes; the
    all-reduce runs over the whole world, so every rank learns the same numbers. The sums stay on the
    device until the one host read at the end (no sync per micro-batch).
    """
    sums = torch.zeros(len(keys), 2, dtype=torch.float64, device=current_device())
    if dist.get_rank(tp_group) == 0:
        for report in reports:
            for i, key in enumerate(keys):
                if key in report:
                    sums[i] += report[key].detach().to(sums.device, torch.float64)
    dist.all_reduce(sums)
    host = sums.tolist()  # the step's one device-to-host read of its losses
    return {key: s / max(n, 1) if n > 0 else float("nan") for key, (s, n) in zip(keys, host, strict=True)}


def grads_finite(trainer: Trainer) -> bool:
    """Whether every gradient on every rank is finite: one min/max pass per grad buffer, one all-reduce.

    ``aminmax`` propagates NaN and +-inf, so checking the two extremes checks every element.
    """
    bad = torch.zeros(1, device=current_device())
    for model in trainer.model:
        for buffer in model.buffers + model.expert_parallel_buffers:
            if buffer.grad_data.numel():
                bad += (~torch.isfinite(torch.stack(torch.aminmax(buffer.grad_data)))).any()
    dist.all_reduce(bad)
    return bad.item() == 0


def train_step(
    trainer: Trainer,
    batches: Iterator[Batch],
    forward_step: Callable = lm_forward_step,
    keys: Sequence[str] = ("lm_loss",),
    num_microbatches: int | None = None,
    seq_length: int | None = None,
    micro_batch_size: int | None = None,
) -> dict[str, float]:
    """Zero grads, forward-backward over the global batch, then step unless anything is non-finite.

    ``keys`` are the reports the forward step's loss returns; the first is the loss checked for finiteness.
    ``seq_length`` / ``micro_batch_size``: every micro-batch's width / rows when they are not ``data.seq_length``
    / ``optim.micro_batch_size`` (pipeline parallelism).
    """
    for model in trainer.model:
        model.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    biases = [(b, b.clone()) for b in trainer.expert_biases]
    metrics = forward_backward(
        trainer,
        batches,
        forward_step,
        keys=keys,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
    )
    loss = metrics.get(keys[0], float("nan"))
    finite = math.isfinite(loss) and grads_finite(trainer)
    grad_norm = float("nan")
    if finite:
        ok, grad_norm, _ = trainer.optimizer.step()
        finite = bool(ok) and grad_norm is not None and math.isfinite(grad_norm)
    if finite:
        trainer.scheduler.step(increment=1)
    else:  # a skipped step changes nothing: undo the expert-bias update finalize_model_grads made
        with torch.no_grad():
            for bias, saved in biases:
                bias.copy_(saved)
    metrics.update(
        grad_norm=grad_norm if grad_norm is not None else float("nan"),
        lr=trainer.optimizer.param_groups[0]["lr"],
        skipped=float(not finite),
    )
    return metrics
