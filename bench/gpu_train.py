"""Training speed on one GPU, as ratios measured in one run: MFU of r1mega's real training step, FP8 vs bf16.

Every model is built and stepped through r1mega's own path (``compose_config`` -> ``build_model`` ->
``build_trainer`` -> ``train_step``: megatron-core local layers, megatron DDP, megatron's optimizer wrapper,
``precision=bf16 precision.transformer_impl=local``), one ``single_process`` parallel state per model.
Parts (each fails on its own: an error line, and the others still run):

* ``ceiling``: bf16 ``torch.matmul`` of 8192^3 on random data, the model GEMMs at their real shapes (forward,
  data-gradient and weight-gradient layouts), and a device-to-device copy.
* ``dense``: a Qwen2-architecture proxy (hidden 4096, 8 layers, 32 heads / 8 KV groups, ffn 11008, vocab
  32000, seq 4096, micro-batch 1, 4 micro-batches a step): MFU against both ceilings.
* ``dsv3``: a DeepSeek-V3 proxy (MLA with q-LoRA 768 / kv-LoRA 512 / qk 128 + rope 64 / v 128; hidden 2048,
  6 layers, first dense; 16 routed experts top-4 of 1408 + one shared, sigmoid group-limited routing, expert
  bias, sequence aux loss; no MTP; seq 4096) with grouped experts (``model.moe_experts=grouped``: two
  ``torch._grouped_mm`` per MoE layer): MFU, and a torch.profiler breakdown of two steps into kernel
  buckets, the optimizer's share, GPU idle time and the kernels launched per step.
* ``dsv3_seq``: the same proxy with megatron-core's SequentialMLP (one expert at a time, the 2026-12-04
  configuration): MFU, a one-step breakdown, and its step time over the grouped one. It runs before ``dsv3``.
* ``fp8``: the dsv3 proxy with ``precision=fp8 precision.fp8_backend=torch`` (r1mega.models.fp8: attention
  up/output projections, dense MLP, shared and routed experts in DeepSeek-V3's blockwise FP8, all of them
  multiples of 128; MLA down-projections, router, embedding and output layer stay bf16): its step time over
  the bf16 one with the same experts (the torch FP8 linears run one expert at a time: ``dsv3_seq``'s timing,
  built again in bf16 if that part did not run), also over the grouped bf16 step, the number of FP8 linears,
  and one profiled micro-batch showing the FP8 GEMM kernels.
* ``loss``: a smaller dsv3 proxy (hidden 1024, 4 layers, seq 1024, 16 experts top-4, 8 x 1024 tokens a step)
  built twice from the same seed in one parallel state, bf16 and FP8 (both with SequentialMLP experts, so that
  their weights start equal), and stepped alternately on the same
  batches of a random Markov chain (8 successors a token: the loss keeps falling for hundreds of steps):
  final loss (mean of the last 20 steps) of each and their relative difference.

Model FLOPs (``r1mega.models.params.flops_per_token(...).training`` x tokens) follow Megatron-LM's
``num_floating_point_operations``: 3 x forward, forward = 2 x activated matmul weights (every projection,
the top-k routed experts, shared expert, router, LM head) + causal attention counted halved
(2 x heads x (d_qk + d_v) x seq / 2 per token and layer). Embedding lookups, norms, softmax, RoPE and the
optimizer are not counted. ``mfu_full_attn`` in the JSON counts the attention square fully.

Time budget: everything by default in about 165 s of wall time on an H200 (``--budget-s``), counted from
the interpreter's start; a part that would not fit is skipped and the loss comparison stops early (both
precisions then have the same steps). Timing: warm-up 3 steps, then the median of 10 (``--quick``: 2 and 5).
The optimizer is megatron's wrapper around ``torch.optim.AdamW`` (no TE/apex FusedAdam here): its share is
timed on every step and shown in the breakdown. On a GPU without Transformer Engine the two megatron-core
accommodations MoE and MLA need there (``te_general_gemm``, ``HAVE_TE``) are applied from r1mega.parallel.cpu_compat.

Examples::

    python bench/gpu_train.py --out /tmp/train          # all parts on CUDA
    python bench/gpu_train.py --only dsv3,fp8 --quick
    python bench/gpu_train.py --device cpu --tiny        # every part at toy sizes on the CPU (the smoke test)
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # the budget counts from here, before torch and megatron-core are imported

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

PARTS = ("dense", "dsv3_seq", "fp8", "dsv3", "loss")
"""In running order: the grouped experts (dsv3) after the parts that do not use them, so that a kernel fault
there (a device-side assert ends the process's CUDA context) costs only the loss part."""
OPT_RANGE = "bench::optimizer_step"
FP8_OVERRIDES = ["precision=fp8", "precision.fp8_backend=torch", "precision.transformer_impl=local"]
BF16_OVERRIDES = ["precision=bf16", "precision.transformer_impl=local"]

# Model sizes: (overrides, seq, micro-batch, micro-batches a step). "full" runs on the GPU, "tiny" on a CPU.
# fmt: off
_MLA_TINY_128 = ["model.hidden_size=128", "model.num_attention_heads=2", "model.q_lora_rank=128",
                 "model.kv_lora_rank=128", "model.qk_head_dim=64", "model.qk_pos_emb_head_dim=128",
                 "model.v_head_dim=64", "model.ffn_hidden_size=256", "model.moe_ffn_hidden_size=128",
                 "model.moe_shared_expert_intermediate_size=128", "model.vocab_size=256",
                 "model.num_layers=2"]
_DSV3_FULL = ["model=deepseek_v3", "model.num_layers=6", "model.hidden_size=2048", "model.ffn_hidden_size=5632",
              "model.num_attention_heads=16", "model.q_lora_rank=768", "model.kv_lora_rank=512",
              "model.qk_head_dim=128", "model.qk_pos_emb_head_dim=64", "model.v_head_dim=128",
              "model.num_experts=16", "model.moe_router_topk=4", "model.moe_ffn_hidden_size=1408",
              "model.moe_shared_expert_intermediate_size=1408", "model.moe_first_k_dense=1",
              "model.vocab_size=32000", "model.max_position_embeddings=4096", "model.mtp_num_layers=0"]
SIZES: dict[str, dict[str, tuple[list[str], int, int, int]]] = {
    "full": {
        "dense": (["model=qwen2_5_7b", "model.num_layers=8", "model.hidden_size=4096", "model.ffn_hidden_size=11008",
                   "model.num_attention_heads=32", "model.num_query_groups=8", "model.vocab_size=32000",
                   "model.max_position_embeddings=4096"], 4096, 1, 4),
        "dsv3": (_DSV3_FULL, 4096, 1, 4),
        "fp8": (_DSV3_FULL, 4096, 1, 4),  # FP8 layers' dims are multiples of 128; MLA down-projections stay bf16
        "loss": (["model=deepseek_v3", "model.num_layers=4", "model.hidden_size=1024", "model.ffn_hidden_size=2816",
                  "model.num_attention_heads=8", "model.q_lora_rank=512", "model.kv_lora_rank=256",
                  "model.qk_head_dim=128", "model.qk_pos_emb_head_dim=64", "model.v_head_dim=128",
                  "model.num_experts=16", "model.moe_router_topk=4", "model.moe_ffn_hidden_size=512",
                  "model.moe_shared_expert_intermediate_size=512", "model.moe_first_k_dense=1",
                  "model.vocab_size=4096", "model.max_position_embeddings=1024", "model.mtp_num_layers=0",
                  "model.init_method_std=0.02"], 1024, 8, 1),
    },
    "tiny": {
        "dense": (["model=qwen2_tiny", "model.vocab_size=256"], 64, 1, 2),
        "dsv3": (["model=dsv3_tiny", "model.mtp_num_layers=0", *_MLA_TINY_128], 64, 1, 2),
        "fp8": (["model=dsv3_tiny", "model.mtp_num_layers=0", *_MLA_TINY_128], 64, 1, 2),
        "loss": (["model=dsv3_tiny", "model.mtp_num_layers=0", *_MLA_TINY_128], 64, 4, 1),
    },
}
# fmt: on
MIN_SECONDS = {"dense": 25.0, "dsv3_seq": 15.0, "dsv3": 20.0, "fp8": 25.0, "loss": 20.0}
SEQUENTIAL = ["model.moe_experts=sequential"]
GROUPED = ["model.moe_experts=grouped"]
"""A part starts only with at least this much of the budget left (full sizes; a tenth of it for --tiny)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {','.join(PARTS)} (default all)")
    p.add_argument("--quick", action="store_true", help="fewer timed steps and 100 loss steps")
    p.add_argument("--tiny", action="store_true", help="toy model sizes (for --device cpu)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default) or cpu")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget (default 165, --tiny 55)")
    p.add_argument("--loss-steps", type=int, default=None, help="steps per precision in the loss part (default 250)")
    p.add_argument("--out", type=Path, default=None, help="write results.json here (nothing is written without it)")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = sorted(set(args.parts) - set(PARTS))
    if bad:
        p.error(f"--only: unknown part(s) {bad}; valid: {','.join(PARTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device; use --device cpu --tiny")
    args.size = "tiny" if args.tiny else "full"
    args.budget_s = args.budget_s or (55.0 if args.tiny else 165.0)
    args.warmup, args.steps = (1, 2) if args.tiny else (2, 5) if args.quick else (3, 10)
    default_loss = 30 if args.tiny else 100 if args.quick else 250
    args.loss_steps = args.loss_steps or default_loss
    return args


def seconds_left(args: argparse.Namespace) -> float:
    return args.budget_s - (time.perf_counter() - _T0)


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- ceilings


def time_op(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 3) -> float:
    """Mean seconds of ``fn`` over ``reps`` runs after ``warmup`` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def gemm_shapes(m: Any, tokens: int) -> list[tuple[str, int, int, int, int]]:
    """The model's bf16 weight GEMMs of one micro-batch: (name, tokens, in, out, how many). The fp32 router is left out."""
    h, L, out = m.hidden_size, m.num_layers, []
    pattern = m.moe_layer_pattern()
    n_moe = sum(pattern)

    def add(name: str, k: int, n: int, count: int, rows: int = tokens) -> None:
        if count:
            out.append((name, rows, k, n, count))

    if m.multi_latent_attention:
        heads, qh = m.num_attention_heads, m.qk_head_dim + m.qk_pos_emb_head_dim
        if m.q_lora_rank:
            add("q_down", h, m.q_lora_rank, L)
            add("q_up", m.q_lora_rank, heads * qh, L)
        else:
            add("q_proj", h, heads * qh, L)
        add("kv_down", h, m.kv_lora_rank + m.qk_pos_emb_head_dim, L)
        add("kv_up", m.kv_lora_rank, heads * (m.qk_head_dim + m.v_head_dim), L)
        add("proj", heads * m.v_head_dim, h, L)
    else:
        add("qkv", h, (m.num_attention_heads + 2 * m.query_groups) * m.head_dim, L)
        add("proj", m.num_attention_heads * m.head_dim, h, L)
    add("fc1", h, 2 * m.ffn_hidden_size, L - n_moe)
    add("fc2", m.ffn_hidden_size, h, L - n_moe)
    if n_moe:
        rows = max(1, round(tokens * m.moe_router_topk / m.num_experts))  # tokens per expert, balanced
        add("expert_fc1", h, 2 * m.moe_ffn_hidden_size, n_moe * m.num_experts, rows)
        add("expert_fc2", m.moe_ffn_hidden_size, h, n_moe * m.num_experts, rows)
        if m.moe_shared_expert_intermediate_size:
            add("shared_fc1", h, 2 * m.moe_shared_expert_intermediate_size, n_moe)
            add("shared_fc2", m.moe_shared_expert_intermediate_size, h, n_moe)
    add("logits", h, m.padded_vocab_size, 1)
    return out


def same_shape_ceiling(m: Any, tokens: int, device: torch.device, reps: int) -> dict[str, Any]:
    """FLOP/s the model's GEMMs reach alone: each (tokens, in, out) in its forward, data-gradient and weight-gradient
    layout; the ceiling is total FLOPs over total time, so each shape weighs as much as its FLOPs."""
    rates: dict[str, float] = {}
    flops = seconds = 0.0
    for name, rows, k, n, count in gemm_shapes(m, tokens):
        x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        dy = torch.randn(rows, n, device=device, dtype=torch.bfloat16)
        layouts = {"fwd": (x, w.t()), "dgrad": (dy, w), "wgrad": (dy.t(), x)}  # y = x w^T, dx = dy w, dw = dy^T x
        for layout, operands in layouts.items():
            t = time_op(partial(torch.matmul, *operands), device, reps)
            rates[f"{name}[{rows}x{k}x{n}].{layout}"] = 2 * rows * k * n / t
            flops += 2 * rows * k * n * count
            seconds += t * count
        del x, w, dy, layouts, operands
    return {"flops_per_s": flops / seconds, "shapes": rates}


def measure_ceilings(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """bf16 n^3 matmul FLOP/s and device-to-device copy bytes/s."""
    n = 256 if args.tiny else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    square = 2 * n**3 / time_op(partial(torch.matmul, a, b), device, reps=3 if args.tiny else 20, warmup=5)
    del a, b
    numel = (1 << 20) if args.tiny else (1 << 29)  # 1 GiB of bf16 on the GPU
    src = torch.empty(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy = 2 * 2 * numel / time_op(partial(dst.copy_, src), device, reps=10)  # bytes read + written
    del src, dst
    return {"matmul_square_n": n, "matmul_square_flops_per_s": square, "copy_bytes_per_s": copy}


# ----------------------------------------------------------------------------- r1mega models


def overrides(args: argparse.Namespace, part: str, precision: list[str], extra: list[str] = ()) -> list[str]:
    """Hydra overrides of one part's model, batch and optimizer."""
    model, seq, micro, n_micro = SIZES[args.size][part]
    return [
        *model,
        *precision,
        f"data.seq_length={seq}",
        f"optim.micro_batch_size={micro}",
        f"optim.global_batch_size={micro * n_micro}",
        "optim.lr=3e-4",
        "optim.min_lr=3e-4",
        "optim.lr_warmup_steps=0",
        "optim.lr_decay_style=constant",
        "optim.train_steps=100000",
        "logging.progress_bar=false",
        *extra,
    ]


def accommodate_no_te() -> None:
    """On a GPU without Transformer Engine megatron-core 0.16.1's MoE router needs ``te_general_gemm`` defined and
    MLA must be told TE is absent; r1mega applies these only on the CPU, so apply those two here."""
    from r1mega.config.validate import detect_accelerator
    from r1mega.parallel import cpu_compat

    if torch.cuda.is_available() and not detect_accelerator().transformer_engine:
        cpu_compat.apply(force=True, only=["missing_te_gemm", "te_stand_ins"])


def build_here(cfg: Any) -> tuple[Any, int]:
    """r1mega's trainer for ``cfg`` in the current parallel state (weights from ``cfg.seed``) and its parameter count."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from r1mega.models.builder import build_model, transformer_config, unwrap
    from r1mega.train.step import build_trainer

    model_parallel_cuda_manual_seed(cfg.seed)  # as bootstrap.initialize: the same weights for every build
    torch.manual_seed(cfg.seed)
    config = transformer_config(cfg)
    trainer = build_trainer(cfg, config, build_model(cfg, config), 1)
    return trainer, sum(p.numel() for p in unwrap(trainer.model[0]).parameters())


@contextlib.contextmanager
def r1mega_trainer(over: list[str]) -> Iterator[tuple[Any, Any, int]]:
    """(cfg, trainer, parameter count) of a model built by r1mega in its own one-process parallel state."""
    from r1mega.config.load import compose_config
    from r1mega.parallel.bootstrap import single_process

    cfg = compose_config(over)
    with single_process(cfg):
        accommodate_no_te()
        trainer, n_params = build_here(cfg)
        try:
            yield cfg, trainer, n_params
        finally:
            del trainer
            gc.collect()
            sync()


def random_batches(cfg: Any, n: int, device: torch.device, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` micro-batches of random tokens on the device, every position carrying loss."""
    b, s, vocab = cfg.optim.micro_batch_size, cfg.data.seq_length, cfg.model.vocab_size
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(n):
        stream = torch.randint(0, vocab, (b, s + 1), device=device, generator=g)  # (b, s + 1)
        out.append({
            "tokens": stream[:, :-1].contiguous(),  # (b, s)
            "labels": stream[:, 1:].contiguous(),  # (b, s)
            "loss_mask": torch.ones(b, s, device=device),  # (b, s)
            "position_ids": torch.arange(s, device=device).expand(b, -1).contiguous(),  # (b, s)
        })  # fmt: skip
    return out


def instrument_optimizer(trainer: Any) -> list[float]:
    """Time every ``optimizer.step`` (synchronised on both sides) inside a profiler range; returns the list it fills.

    ``train_step`` already waits on the device before the optimizer (its finite-gradient check), so the
    added synchronisations cost nothing and the range holds exactly the optimizer's kernels. On a GPU two
    one-cycle ``torch.cuda._sleep`` kernels mark the range on the kernel timeline."""
    from torch.profiler import record_function

    times: list[float] = []
    original = trainer.optimizer.step

    mark = torch.cuda._sleep if torch.cuda.is_available() else lambda cycles: None  # "spin_kernel" bounds it

    def step(*a: Any, **k: Any) -> Any:
        sync()
        t0 = time.perf_counter()
        with record_function(OPT_RANGE):
            mark(1)
            result = original(*a, **k)
            mark(1)
            sync()
        times.append(time.perf_counter() - t0)
        return result

    trainer.optimizer.step = step
    return times


def step_fn(trainer: Any, batches: list[dict[str, torch.Tensor]], micro: int | None = None) -> Callable[[], Any]:
    """One r1mega ``train_step`` over ``batches`` (one global batch; ``micro``: only that many micro-batches)."""
    from r1mega.train.step import train_step

    return lambda: train_step(trainer, iter(batches[:micro]), num_microbatches=micro)


def timed_steps(step: Callable[[], dict[str, float]], warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Step times (s) and losses of ``steps`` steps after ``warmup``."""
    losses = [step()["lm_loss"] for _ in range(warmup)]
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        losses.append(step()["lm_loss"])
        sync()
        times.append(time.perf_counter() - t0)
    return times, losses


# ----------------------------------------------------------------------------- profile breakdown

# fmt: off
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("communication", ("nccl", "c10d::", "all_reduce", "all_to_all", "allgather", "reduce_scatter")),
    ("memcpy/memset", ("memcpy", "memset")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "scaled_mm", "aten::mm", "aten::addmm",
              "aten::bmm", "aten::_scaled_mm", "grouped_mm", "splitk")),
    ("index/sort/topk", ("index", "scatter", "gather", "sort", "topk", "radix", "cumsum", "scan", "histc",
                         "bincount", "nonzero", "unique", "embedding", "masked_select")),
    ("elementwise/norm/reduce", ("elementwise", "vectorized", "unrolled", "reduce", "norm", "softmax", "silu",
                                 "triton", "mul", "add", "copy", "fill", "cat", "where", "pow", "exp", "log",
                                 "rsqrt", "sigmoid", "sum", "mean", "clamp", "neg", "div", "sub", "cross_entropy",
                                 "nll", "arange", "zero", "ones", "amax", "max", "min")),
)
BUCKET_NAMES = ("gemm", "attention", "index/sort/topk", "elementwise/norm/reduce", "optimizer", "communication",
                "memcpy/memset", "other")
# fmt: on
"""index/sort/topk holds MoE routing and token permutation, and also the embedding backward and loss gathers."""
FP8_MARKS = ("e4m3", "e5m2", "fp8", "float8", "f8f8", "scaled_mm", "blk128", "vec128")
"""Substrings of FP8 GEMM kernel names and of torch's scaled-matmul ops; cuBLASLt's block-scaled Hopper kernels are
named like ``nvjet_sm90_qqtst_..._Ablk128_Bvec128_TNN`` (seen on the H200, 2026-12-04)."""


def classify(name: str) -> str:
    low = name.lower()
    for bucket, keys in BUCKETS:
        if any(key in low for key in keys):
            return bucket
    return "other"


def _union(intervals: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _self_times(ops: list[tuple[str, int, int, int]]) -> list[tuple[str, int, int]]:
    """(name, start, self ns) of nested CPU ops (name, thread, start, end): each op's time minus its children's."""
    out: list[list[Any]] = []
    stacks: dict[int, list[int]] = {}
    for name, thread, start, end in sorted(ops, key=lambda o: (o[1], o[2], -o[3])):
        stack = stacks.setdefault(thread, [])
        while stack and out[stack[-1]][3] <= start:
            stack.pop()
        if stack:
            out[stack[-1]][2] -= end - start
        stack.append(len(out))
        out.append([name, start, end - start, end])
    return [(name, start, self_ns) for name, start, self_ns, _ in out]


def profile_breakdown(step: Callable[[], Any], n: int, device: torch.device) -> dict[str, Any]:
    """Kernel time per bucket per step over ``n`` profiled steps: device kernels on a GPU (CUDA activity only, so
    host-side profiling adds little), aten self time on a CPU. Kernels inside the optimizer's markers count as
    ``optimizer``; ``idle`` is wall time with no kernel running. Reads kineto's raw events (fast)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        wall_ns = (time.perf_counter() - t0) * 1e9
    events = prof.profiler.kineto_results.events()
    if cuda:
        ops = [(e.name(), e.start_ns(), e.duration_ns()) for e in events
               if e.device_type() == DeviceType.CUDA and not getattr(e, "is_user_annotation", bool)()]  # fmt: skip
        if not ops:
            raise RuntimeError("the profiler recorded no CUDA kernels")
        marks = sorted(start for name, start, _ in ops if "spin_kernel" in name)
        windows = list(zip(marks[0::2], marks[1::2], strict=False))
        busy = _union([(start, start + ns) for _, start, ns in ops])
    else:
        cpu = [e for e in events if e.device_type() == DeviceType.CPU]
        windows = [(e.start_ns(), e.end_ns()) for e in cpu if e.name() == OPT_RANGE]
        ops = _self_times([(e.name(), e.start_thread_id(), e.start_ns(), e.end_ns())
                           for e in cpu if e.name().startswith("aten::")])  # fmt: skip
        busy = sum(ns for _, _, ns in ops)
    buckets = dict.fromkeys(BUCKET_NAMES, 0)
    gemms: dict[str, int] = {}
    names: dict[str, str] = {}
    for name, start, ns in ops:
        bucket = "optimizer" if any(a <= start <= b for a, b in windows) else names.setdefault(name, classify(name))
        buckets[bucket] += ns
        if bucket == "gemm":
            gemms[name] = gemms.get(name, 0) + ns
    fp8_ns = sum(ns for name, ns in gemms.items() if any(key in name.lower() for key in FP8_MARKS))
    per_step = {k: v / 1e9 / n for k, v in buckets.items()}
    per_step["idle" if cuda else "host (not in aten ops)"] = max(0.0, wall_ns - busy) / 1e9 / n
    top = sorted(gemms.items(), key=lambda kv: -kv[1])[:4]
    return {
        "wall_per_step_s": wall_ns / 1e9 / n,
        "kernels_per_step": len(ops) / n,  # device kernels (CPU: aten ops): what the host launches
        "per_step_s": per_step,
        "fp8_gemm_s_per_step": fp8_ns / 1e9 / n,
        "top_gemm_kernels_ms": {name[:100]: round(ns / 1e6 / n, 3) for name, ns in top},
    }


# ----------------------------------------------------------------------------- parts


def flops_per_step(cfg: Any) -> tuple[float, float]:
    """Model training FLOPs per step: (Megatron-LM's convention, causal attention halved; attention counted fully)."""
    from r1mega.models.params import flops_per_token

    f = flops_per_token(cfg.model, cfg.data.seq_length)
    tokens = cfg.optim.global_batch_size * cfg.data.seq_length
    return f.training * tokens, (f.training + 3 * f.attention) * tokens


def describe(cfg: Any) -> str:
    m = cfg.model
    moe = f" E{m.num_experts} top{m.moe_router_topk} ffe{m.moe_ffn_hidden_size}" if m.is_moe else ""
    att = f" mla q{m.q_lora_rank} kv{m.kv_lora_rank} rope{m.qk_pos_emb_head_dim}" if m.multi_latent_attention else ""
    return (
        f"{m.family} h{m.hidden_size} L{m.num_layers} heads{m.num_attention_heads}/{m.query_groups} ffn{m.ffn_hidden_size}"
        f"{att}{moe} V{m.padded_vocab_size} s{cfg.data.seq_length} gbs{cfg.optim.global_batch_size}"
    )


def mfu_part(
    args: argparse.Namespace, part: str, env: dict[str, Any], profile_steps: int = 0, extra: list[str] = ()
) -> dict[str, Any]:
    """Build one bf16 model, time its steps, and compute MFU against both ceilings (``profile_steps``: breakdown)."""
    from r1mega.config.load import compose_config

    cfg = compose_config(overrides(args, part, BF16_OVERRIDES, extra))
    micro_tokens = cfg.optim.micro_batch_size * cfg.data.seq_length
    shape = same_shape_ceiling(cfg.model, micro_tokens, env["device"], reps=2 if args.tiny else 10)
    flops, flops_full = flops_per_step(cfg)
    with r1mega_trainer(overrides(args, part, BF16_OVERRIDES, extra)) as (cfg, trainer, n_params):
        experts = moe_experts_built(trainer)
        opt_times = instrument_optimizer(trainer)
        optimizer = describe_optimizer(trainer.optimizer)
        batches = random_batches(cfg, cfg.optim.global_batch_size // cfg.optim.micro_batch_size, env["device"])
        step = step_fn(trainer, batches)
        times, losses = timed_steps(step, args.warmup, args.steps)
        breakdown = None
        if profile_steps:
            try:
                breakdown = profile_breakdown(step, profile_steps, env["device"])
            except Exception as e:  # the profiler is a nicety: report and go on
                breakdown = {"error": f"{type(e).__name__}: {e}"}
    t = statistics.median(times)
    square = env["ceiling"]["matmul_square_flops_per_s"]
    result = {
        "model": describe(cfg),
        "moe_experts": experts,
        "params": n_params,
        "tokens_per_step": cfg.optim.global_batch_size * cfg.data.seq_length,
        "model_flops_per_step": flops,
        "step_s": t,
        "step_s_min": min(times),
        "optimizer_s": statistics.median(opt_times[-len(times) :]) if opt_times else float("nan"),
        "optimizer_impl": optimizer,
        "tokens_per_s": cfg.optim.global_batch_size * cfg.data.seq_length / t,
        "model_flops_per_s": flops / t,
        "mfu_square": flops / t / square,
        "mfu_same_shape": flops / t / shape["flops_per_s"],
        "mfu_full_attn": flops_full / t / square,
        "same_shape_ceiling_flops_per_s": shape["flops_per_s"],
        "same_shape_gemms": shape["shapes"],
        "loss_first_last": [losses[0], losses[-1]],
    }
    if breakdown is not None:
        result["breakdown"] = breakdown
        gemm_s = breakdown.get("per_step_s", {}).get("gemm", 0.0)
        if gemm_s:
            result["gemm_kernel_flops_per_s"] = (
                sum(2 * r * k * n * c * 3 for _, r, k, n, c in gemm_shapes(cfg.model, micro_tokens))
                * (cfg.optim.global_batch_size // cfg.optim.micro_batch_size)
                / gemm_s
            )
    return result


def moe_experts_built(trainer: Any) -> str | None:
    """The class running the model's routed experts (TorchGroupedMLP, SequentialMLP, ...), None when dense."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    kinds = {type(m.experts).__name__ for m in trainer.model[0].modules() if isinstance(m, MoELayer)}
    return ",".join(sorted(kinds)) or None


def describe_optimizer(optimizer: Any) -> str:
    """The torch optimizer class megatron's wrapper(s) drive, e.g. torch.optim.adamw.AdamW(foreach=None, fused=None)."""
    names = []
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(wrapper, "optimizer", wrapper)
        d = getattr(inner, "defaults", {})
        names.append(
            f"{type(wrapper).__name__}({type(inner).__module__}.{type(inner).__name__}, "
            f"foreach={d.get('foreach')}, fused={d.get('fused')})"
        )
    return " + ".join(dict.fromkeys(names))


def fp8_linears(trainer: Any) -> int:
    """How many linear layers of the model run their GEMMs in FP8 (r1mega.models.fp8's layers that took the path)."""
    return sum(type(m).__name__.startswith("FP8") and m.fp8 is True for m in trainer.model[0].modules())


def fp8_gemm_path() -> str:
    try:
        from r1mega.models.fp8 import fp8_gemm_path as path

        return str(path())
    except Exception as e:
        return f"unavailable ({type(e).__name__}: {e})"


def _unavailable(e: Exception) -> bool:
    """Whether FP8 is missing here (no module, or the config refuses it) rather than broken."""
    from r1mega.config.errors import ConfigError

    return isinstance(e, (ImportError, ConfigError, NotImplementedError))


def part_fp8(args: argparse.Namespace, env: dict[str, Any], bf16: dict[str, Any] | None) -> dict[str, Any]:
    """FP8 step time against bf16 on the same model with the same experts (SequentialMLP: the dsv3_seq part's
    timing when it is the same model), and one profiled FP8 step: the FP8 GEMM kernels' share and the largest
    GEMM kernels by name."""
    result: dict[str, Any] = {"fp8_gemm_path": fp8_gemm_path()}
    same_model = SIZES[args.size]["fp8"] == SIZES[args.size]["dsv3"] and bf16 and "step_s" in bf16
    if same_model:
        result["bf16"] = {"step_s": bf16["step_s"], "params": bf16["params"], "from": "dsv3_seq part"}
    for name, precision in (("bf16", BF16_OVERRIDES), ("fp8", FP8_OVERRIDES)):
        if name in result:
            continue
        try:
            with r1mega_trainer(overrides(args, "fp8", precision, SEQUENTIAL)) as (cfg, trainer, n_params):
                batches = random_batches(cfg, cfg.optim.global_batch_size // cfg.optim.micro_batch_size, env["device"])
                step = step_fn(trainer, batches)
                times, losses = timed_steps(step, args.warmup, min(args.steps, 5))  # FP8 steps are the slow ones
                result[name] = {"step_s": statistics.median(times), "params": n_params, "loss_last": losses[-1],
                                "fp8_linears": fp8_linears(trainer)}  # fmt: skip
                result["model"] = describe(cfg)
                if name == "fp8":
                    try:
                        prof = profile_breakdown(step_fn(trainer, batches, micro=1), 1, env["device"])
                        result[name]["fp8_gemm_share"] = prof["fp8_gemm_s_per_step"] / prof["wall_per_step_s"]
                        result[name]["top_gemm_kernels_ms"] = prof["top_gemm_kernels_ms"]
                    except Exception as e:
                        result[name]["profile_error"] = f"{type(e).__name__}: {e}"
                del trainer, step, batches  # before the next model is built
        except Exception as e:
            if name == "fp8" and _unavailable(e):
                result["fp8"] = {"unavailable": f"{type(e).__name__}: {e}"}
                break
            raise
    if "step_s" in result.get("fp8", {}):
        result["ratio_fp8_over_bf16"] = result["fp8"]["step_s"] / result["bf16"]["step_s"]
    return result


def markov_data(n_seq: int, seq: int, vocab: int, seed: int = 7, fanout: int = 8) -> torch.Tensor:
    """(n_seq, seq + 1) tokens of a random first-order Markov chain: each token has ``fanout`` successors with
    random probabilities, so the loss falls from log(vocab) towards the chain's entropy over many steps."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, fanout), generator=g)  # (V, fanout)
    cdf = torch.softmax(1.5 * torch.randn(vocab, fanout, generator=g), dim=-1).cumsum(-1)  # (V, fanout)
    cdf[:, -1] = 1.0
    u = torch.rand(seq, n_seq, 1, generator=g)  # (s, n, 1)
    out = torch.empty(n_seq, seq + 1, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (n_seq,), generator=g)
    for t in range(seq):
        cur = out[:, t]
        pick = torch.searchsorted(cdf[cur], u[t]).clamp_(max=fanout - 1)  # (n, 1)
        out[:, t + 1] = succ[cur, pick.squeeze(1)]
    return out


def part_loss(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    """bf16 and FP8 models from the same seed in one parallel state, stepped alternately on the same batches until
    ``--loss-steps`` or the budget runs out, so both always have the same number of steps."""
    from r1mega.config.load import compose_config
    from r1mega.config.validate import validate
    from r1mega.parallel.bootstrap import single_process
    from r1mega.train.step import train_step

    lr = ["optim.lr=1.5e-3", "optim.min_lr=1.5e-3", "optim.lr_warmup_steps=20"]
    lr += SEQUENTIAL  # the torch FP8 experts are SequentialMLP; grouped experts would start from other weights
    cfgs = {"bf16": compose_config(overrides(args, "loss", BF16_OVERRIDES, lr))}
    result: dict[str, Any] = {"model": describe(cfgs["bf16"])}
    try:
        cfgs["fp8"] = compose_config(overrides(args, "loss", FP8_OVERRIDES, lr))
        validate(cfgs["fp8"], 1)
    except Exception as e:
        if not _unavailable(e):
            raise
        result["fp8"] = f"unavailable ({type(e).__name__}: {e})"
        cfgs.pop("fp8", None)
    cfg = cfgs["bf16"]
    b, s, gbs = cfg.optim.micro_batch_size, cfg.data.seq_length, cfg.optim.global_batch_size
    data = markov_data(min(args.loss_steps, 4096 // gbs) * gbs, s, cfg.model.vocab_size).to(env["device"])
    pos = torch.arange(s, device=env["device"]).expand(b, -1).contiguous()  # (b, s)
    ones = torch.ones(b, s, device=env["device"])  # (b, s)
    losses: dict[str, list[float]] = {name: [] for name in cfgs}
    with single_process(cfg):
        accommodate_no_te()
        trainers = {"bf16": build_here(cfg)[0]}
        if "fp8" in cfgs:
            try:
                trainers["fp8"] = build_here(cfgs["fp8"])[0]
                result["fp8_linears"] = fp8_linears(trainers["fp8"])
            except Exception as e:
                if not _unavailable(e):
                    raise
                result["fp8"] = f"unavailable ({type(e).__name__}: {e})"
                del losses["fp8"]
        deadline = time.perf_counter() + max(5.0, seconds_left(args) - 5.0)
        t0 = time.perf_counter()
        for i in range(args.loss_steps):
            start = (i * gbs) % len(data)
            rows = data[start : start + gbs]  # (gbs, s + 1)
            micro = [{"tokens": rows[j : j + b, :-1], "labels": rows[j : j + b, 1:], "loss_mask": ones,
                      "position_ids": pos} for j in range(0, gbs, b)]  # fmt: skip
            for name, trainer in trainers.items():
                losses[name].append(train_step(trainer, iter(micro))["lm_loss"])
            if time.perf_counter() > deadline:
                break
        result["seconds"] = time.perf_counter() - t0
        trainer = trainers = None  # free both models before the parallel state goes
    n = len(losses["bf16"])
    window = min(20, n)
    result.update(steps=n, window=window)
    for name, values in losses.items():
        result[f"{name}_first"] = values[0]
        result[f"{name}_final"] = statistics.fmean(values[-window:])
    if "fp8" in losses:
        result["rel_diff"] = (result["fp8_final"] - result["bf16_final"]) / result["bf16_final"]
    return result


# ----------------------------------------------------------------------------- report


def _fmt_flops(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x / 1e12:.1f}"


def print_summary(env: dict[str, Any], results: dict[str, Any]) -> None:
    """The compact table, starting with a ``=== `` line (tools/gpu_check.sh prints from there)."""
    c = env.get("ceiling", {})
    print(f"\n=== bench/gpu_train.py: {env['device_name']}, torch {torch.__version__} ===")
    if "matmul_square_flops_per_s" in c:
        n = c["matmul_square_n"]
        print(f"ceiling: bf16 matmul {n}^3 {_fmt_flops(c['matmul_square_flops_per_s'])} TFLOP/s, "
              f"d2d copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s")  # fmt: skip
    print(f"{'part':6s} {'step s':>7s} {'opt s':>6s} {'tok/s':>9s} {'TFLOP/s':>8s} {'MFU sq':>7s} {'MFU shp':>7s} "
          f"{'shape ceil':>10s}  model")  # fmt: skip
    for part in ("dense", "dsv3_seq", "dsv3"):
        r = results.get(part)
        if not r:
            continue
        if "step_s" not in r:
            print(f"{part:8s} {r.get('error') or r.get('skipped')}")
            continue
        print(
            f"{part:8s} {r['step_s']:7.3f} {r['optimizer_s']:6.3f} {r['tokens_per_s']:9.0f} "
            f"{_fmt_flops(r['model_flops_per_s']):>8s} {r['mfu_square']:7.1%} {r['mfu_same_shape']:7.1%} "
            f"{_fmt_flops(r['same_shape_ceiling_flops_per_s']):>10s}  {r['model']}"
            + (f" ({r['moe_experts']})" if r.get("moe_experts") else "")
        )
    grouped, sequential = results.get("dsv3") or {}, results.get("dsv3_seq") or {}
    if "step_s" in grouped and "step_s" in sequential:
        print(f"dsv3   grouped experts: step {sequential['step_s']:.3f} -> {grouped['step_s']:.3f} s, "
              f"{sequential['step_s'] / grouped['step_s']:.2f}x faster than SequentialMLP")  # fmt: skip
    impl = next(
        (results[p]["optimizer_impl"] for p in ("dense", "dsv3") if "optimizer_impl" in results.get(p, {})), None
    )
    if impl:
        print(f"optimizer: {impl}")
    for part in ("dense", "dsv3_seq", "dsv3"):
        bd = (results.get(part) or {}).get("breakdown")
        if not bd:
            continue
        if "error" in bd:
            print(f"{part} breakdown: profiler failed: {bd['error']}")
            continue
        wall = bd["wall_per_step_s"]
        cells = ", ".join(f"{k} {v * 1e3:.0f} ms ({v / wall:.0%})" for k, v in bd["per_step_s"].items() if v > 0)
        gemm = results[part].get("gemm_kernel_flops_per_s")
        kernels = bd.get("kernels_per_step")
        launched = f", {kernels:.0f} kernels" if kernels else ""
        print(f"{part} breakdown per step ({wall * 1e3:.0f} ms profiled{launched}): {cells}")
        if gemm:
            print(f"{part} GEMM kernels alone run at {_fmt_flops(gemm)} TFLOP/s of model matmul FLOPs")
    r = results.get("fp8")
    if r:
        if "ratio_fp8_over_bf16" in r:
            share = r["fp8"].get("fp8_gemm_share")
            share_s = f", FP8 GEMM kernels {share:.0%} of a 1-micro-batch step" if share is not None else ""
            share_s += f", {r['fp8'].get('fp8_linears')} FP8 linears"
            print(f"fp8    step bf16 {r['bf16']['step_s']:.3f} s, fp8 {r['fp8']['step_s']:.3f} s: "
                  f"fp8/bf16 = {r['ratio_fp8_over_bf16']:.3f}{share_s} (gemm path: {r['fp8_gemm_path']}; "
                  "both with SequentialMLP experts)")  # fmt: skip
            if "step_s" in grouped:
                print(f"fp8    over the grouped-experts bf16 step ({grouped['step_s']:.3f} s): "
                      f"{r['fp8']['step_s'] / grouped['step_s']:.3f}")  # fmt: skip
        else:
            detail = r.get("error") or r.get("skipped") or (r.get("fp8") or {}).get("unavailable")
            print(f"fp8    {'unavailable' if 'fp8' in r else 'failed'}: {detail} (gemm path: {r.get('fp8_gemm_path')})")
    r = results.get("loss")
    if r:
        if "rel_diff" in r:
            print(f"loss   {r['steps']} steps, mean of last {r['window']}: bf16 {r['bf16_final']:.4f}, "
                  f"fp8 {r['fp8_final']:.4f}, rel diff {r['rel_diff']:+.3%} (first {r['bf16_first']:.3f}/"
                  f"{r['fp8_first']:.3f}; {r['seconds']:.0f} s for both)")  # fmt: skip
        elif "bf16_final" in r:
            print(f"loss   {r['steps']} bf16 steps: {r['bf16_final']:.4f}; fp8 {r.get('fp8')}")
        else:
            print(f"loss   {r.get('error') or r.get('skipped')}")


def run_part(name: str, fn: Callable[[], dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Run one part; an exception becomes an ``error`` entry and the next part runs."""
    need = MIN_SECONDS.get(name, 0.0) * (0.1 if args.tiny else 1.0)
    if seconds_left(args) < need:
        return {"skipped": f"only {seconds_left(args):.0f} s of the {args.budget_s:.0f} s budget left"}
    print(f"--- {name} ({time.perf_counter() - _T0:.0f} s in)", flush=True)
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as e:
        print(f"error: {name}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(limit=6)
        result = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    result["part_seconds"] = time.perf_counter() - t0
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"    {name}: {json.dumps(_short(result))}", flush=True)
    return result


def _short(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("same_shape_gemms",)}


def main(argv: list[str] | None = None) -> int:
    """Run the ceilings and the chosen parts, then print the table and the ``TRAIN_GPU`` line."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)  # megatron's TE/apex fallback notices
    device = torch.device(args.device)
    if device.type == "cuda":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # read at the first allocation
        torch.cuda.set_device(0)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # r1mega chooses its device from torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    env: dict[str, Any] = {"device": device, "device_name": name}
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        name += f", megatron-core {version('megatron-core')}"
        env["device_name"] = name
    from r1mega.models.builder import build_model  # noqa: F401  (megatron-core imported before the budget check)

    results: dict[str, Any] = {}
    ceiling = run_part("ceiling", lambda: measure_ceilings(args, device), args)
    env["ceiling"] = ceiling
    results["ceiling"] = ceiling
    runs = {
        "dense": lambda: mfu_part(args, "dense", env),
        "dsv3_seq": lambda: mfu_part(args, "dsv3", env, profile_steps=1, extra=SEQUENTIAL),
        "dsv3": lambda: mfu_part(args, "dsv3", env, profile_steps=2, extra=GROUPED),
        "fp8": lambda: part_fp8(args, env, results.get("dsv3_seq")),
        "loss": lambda: part_loss(args, env),
    }
    for part in args.parts:
        if part in ("dense", "dsv3", "dsv3_seq") and "matmul_square_flops_per_s" not in ceiling:
            results[part] = {"error": "no matmul ceiling"}
            continue
        results[part] = run_part(part, runs[part], args)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print_summary(env, results)
    line = {k: _short(v) for k, v in results.items()}
    line["device"] = name
    line["wall_s"] = time.perf_counter() - _T0
    print("TRAIN_GPU " + json.dumps(line, default=str), flush=True)
    failed = [k for k, v in results.items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
