"""The megatron-core code paths each CPU accommodation exists for (run by tests/parallel/test_cpu_compat.py).

usage: python cpu_compat_probe.py WITHOUT PROBE [PROBE ...]
  WITHOUT  the accommodation to leave out (every other one is installed), or "none"
  PROBE    an accommodation name: run the checks of ``PROBES[PROBE]`` (probes run in one process
           must share a layout, see ``LAYOUTS``; a probe without one runs under any)

Every check prints one line ``PROBE_RESULT {json}``: ``ok`` and, on failure, the exception type, its
message and the megatron-core file and line it came out of. Failing checks do not stop the worker (it exits 0);
tests/parallel/test_cpu_compat.py judges the lines. This module's top level does not import
megatron-core, so the test can read ``PROBES`` cheaply.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable

import torch

from r1mega.config.load import compose_config
from r1mega.parallel import cpu_compat

SEQ = ["data.seq_length=16", "optim.micro_batch_size=1", "optim.global_batch_size=2", "parallel.world_size=null"]
"""Overrides every check shares: a tiny batch, and whatever world size the launcher gives."""
DENSE = ["model=llama_tiny", *SEQ]
MOE = [*DENSE, "model.num_experts=4", "model.moe_ffn_hidden_size=32", "model.moe_router_topk=2"]
"""llama_tiny with every layer MoE (standard attention, alltoall dispatcher)."""

RESULT_TAG = "PROBE_RESULT"


def _forward(overrides: list[str]) -> None:
    """Build the model ``overrides`` describe and run one forward with a loss (no backward)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from r1mega.data.synthetic import synthetic_batch
    from r1mega.models.builder import build_model

    cfg = compose_config(overrides)
    (model,) = build_model(cfg)
    batch = synthetic_batch(cfg.optim.micro_batch_size, cfg.data.seq_length, cfg.model.vocab_size, seed=3)
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # (b, s)
    assert torch.isfinite(loss).all(), "the forward gave a non-finite loss"
    get_moe_layer_wise_logging_tracker().clear()  # the next MoE model in this process may differ


def _train_step(overrides: list[str]) -> None:
    """Wrap, build the optimizer and take one training step (grad clipping on: optim.clip_grad=1.0)."""
    from r1mega.data.synthetic import synthetic_batch
    from r1mega.models.builder import build_model, transformer_config
    from r1mega.train.step import build_trainer, train_step

    cfg = compose_config([*overrides, "optim.clip_grad=1.0"])
    config = transformer_config(cfg)
    trainer = build_trainer(cfg, config, build_model(cfg, config), dp=1)
    batch = synthetic_batch(cfg.optim.micro_batch_size, cfg.data.seq_length, cfg.model.vocab_size, seed=3)
    metrics = train_step(trainer, iter([batch] * trainer.num_microbatches))
    assert metrics["skipped"] == 0.0, f"the step was skipped: {metrics}"


# cuda_device_shim: rotary embeddings move their frequencies to torch.cuda.current_device().


def rope() -> None:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    emb = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)
    assert emb(8).shape == (8, 1, 1, 16)  # (seq, 1, 1, head_dim)


def yarn() -> None:
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    emb = YarnRotaryEmbedding(
        kv_channels=16, scaling_factor=4.0, original_max_position_embeddings=256, use_cpu_initialization=True
    )
    freqs, _mscale = emb(8)
    assert freqs.shape == (8, 1, 1, 16)  # (seq, 1, 1, head_dim)


# cuda_rng_tracker: megatron's tracker saves, seeds and restores the CUDA generator.


def fork() -> None:
    """``model_parallel_cuda_manual_seed``, then ``fork()`` must switch to the tracked state, on the CPU.

    Without the accommodation (and with the shim) nothing crashes: megatron's ``_set_cuda_rng_state``
    hands its work to ``torch.cuda._lazy_call``, which on a CPU build queues it (with a formatted stack)
    for a CUDA initialisation that never comes. Every set is lost and every call leaks a queue entry.
    """
    from megatron.core.tensor_parallel import random

    queued = len(torch.cuda._queued_calls)
    random.model_parallel_cuda_manual_seed(1234)
    tracker = random.get_cuda_rng_tracker()
    states = tracker.get_states()
    with tracker.fork():  # the model-parallel state
        inside = random._get_cuda_rng_state()
    leaked = len(torch.cuda._queued_calls) - queued
    switched = torch.equal(inside, states["model-parallel-rng"])
    assert switched and not leaked, (
        f"fork() did not switch to the tracked CUDA RNG state (switched={switched}); "
        f"{leaked} CUDA RNG calls were queued on torch.cuda's lazy-init queue instead"
    )


# fp32_type_checks: the optimizers compare param.type() with CUDA type names.


def fp32_distributed_optimizer() -> None:
    _train_step([*DENSE, "parallel.use_distributed_optimizer=true"])


def fp32_grad_clipping() -> None:
    _train_step(DENSE)


def bf16_optimizer() -> None:
    _train_step([*DENSE, "precision=bf16"])


def bf16_distributed_optimizer() -> None:
    _train_step([*DENSE, "precision=bf16", "parallel.use_distributed_optimizer=true"])


# alltoall_split_sizes: EP=2 with the alltoall dispatcher exchanges tokens with all_to_all_single.


def expert_parallel_alltoall() -> None:
    _forward([*MOE, "parallel=ep2"])


# tensor_cuda_calls: the embedding shared by the first and last pipeline stages is moved with .cuda().


def tied_embeddings() -> None:
    from r1mega.models.builder import build_model

    build_model(compose_config(["model=qwen2_tiny", *SEQ, "parallel=pp2"]))


def mtp_embedding() -> None:
    from r1mega.models.builder import build_model

    build_model(compose_config(["model=dsv3_tiny", *SEQ, "parallel=pp2"]))


# missing_te_gemm: every MoE router's gating GEMM reads moe_utils.te_general_gemm.


def moe_router() -> None:
    _forward(MOE)


# te_stand_ins: MLA checks isinstance() against TE classes, which are mocks without TE.


def mla() -> None:
    _forward(["model=dsv3_tiny", *SEQ])


PROBES: dict[str, list[Callable[[], None]]] = {
    "cuda_device_shim": [rope, yarn],
    "cuda_rng_tracker": [fork],
    "fp32_type_checks": [fp32_distributed_optimizer, fp32_grad_clipping, bf16_optimizer, bf16_distributed_optimizer],
    "alltoall_split_sizes": [expert_parallel_alltoall],
    "tensor_cuda_calls": [tied_embeddings, mtp_embedding],
    "missing_te_gemm": [moe_router],
    "te_stand_ins": [mla],
}
"""Accommodation -> the checks that need it; a check's id is ``accommodation.function``."""

LAYOUTS: dict[str, str | None] = {
    "cuda_device_shim": None,  # no parallel state: bootstrap itself needs the shim
    "cuda_rng_tracker": "single",
    "fp32_type_checks": "single",
    "alltoall_split_sizes": "ep2",
    "tensor_cuda_calls": "pp2",
    "missing_te_gemm": "single",
    "te_stand_ins": "single",
}
"""The ``parallel`` preset each probe's checks run under (None: no process group at all)."""


def install(without: str | None) -> list[str]:
    """Install every accommodation except ``without``, and stop anything from installing more."""
    names = [name for name in cpu_compat.ACCOMMODATIONS if name != without]
    installed = cpu_compat.apply(only=names)
    assert without not in installed and sorted(installed) == sorted(names), installed
    # bootstrap.initialize calls cpu_compat.apply() with every name: from here on it installs nothing.
    cpu_compat.apply = lambda force=False, only=None: list(installed)
    return installed


def _where(error: BaseException) -> tuple[str, str]:
    """The innermost megatron-core frame of the traceback (else the innermost one): file from ``megatron/`` on, line."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        path = frame.filename.replace(os.sep, "/")
        if "/megatron/" in path:
            return "megatron/" + path.split("/megatron/", 1)[1], frame.line or ""
    return os.path.basename(frames[-1].filename), frames[-1].line or ""


def run_check(probe: str, check: Callable[[], None], rank: int) -> None:
    """Run one check and print its ``PROBE_RESULT`` line."""
    result: dict[str, object] = {"check": f"{probe}.{check.__name__}", "rank": rank, "ok": True}
    try:
        check()
    except Exception as e:  # the judgement is the test's: report what failed, where
        traceback.print_exc()
        where, line = _where(e)
        result.update(ok=False, type=type(e).__name__, message=str(e), where=where, line=line)
    print(RESULT_TAG, json.dumps(result), flush=True)


def main(without: str, probes: list[str]) -> None:
    install(None if without == "none" else without)
    layouts = {LAYOUTS[p] for p in probes} - {None}
    assert len(layouts) <= 1, f"probes in one process must share a layout: {probes}"
    layout = layouts.pop() if layouts else None
    if layout is not None:
        from r1mega.parallel import bootstrap

        bootstrap.initialize(compose_config([f"parallel={layout}", *SEQ, "parallel.timeout_minutes=1"]))
    rank = int(os.environ.get("RANK", 0))
    try:
        for probe in probes:
            for check in PROBES[probe]:
                run_check(probe, check, rank)
    finally:
        if layout is not None:
            bootstrap.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
