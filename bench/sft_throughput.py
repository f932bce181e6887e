"""SFT throughput: r1mega's training step against a plain Hugging Face + ``torch.optim.AdamW`` loop.

One process builds the same dense Qwen2-architecture model twice, once through r1mega
(``compose_config`` -> ``build_model`` -> ``build_trainer`` -> ``train_step``: megatron-core's local
layers, megatron DDP, megatron's optimizer wrapper around ``torch.optim.AdamW``) and once as
``transformers.Qwen2ForCausalLM`` (``attn_implementation="sdpa"``) trained by a hand-written loop
(forward, token-mean cross entropy, backward, ``clip_grad_norm_(1.0)``, ``AdamW.step``, ``zero_grad``).
Both see the same fixed random batch, every token carrying loss, with the same dtype, thread count,
optimizer hyper-parameters and parameter count (checked). It also times ``torch.matmul`` (an n x n x n
product and the model's QKV, fc1 and logits GEMM shapes; the fastest is the ceiling) and reports
tokens/s for both sides, their ratio (r1mega / HF), and the model FLOP/s each achieves as a fraction
of that ceiling.

The default vocabulary is 8192, CPU-sized: Qwen2's real 151,936 would put ~85% of the FLOPs of a
hidden-512 model in the output layer, which both sides compute identically.

Timing: after ``--warmup`` steps each, the two loops alternate in ``--rounds`` rounds of ``--steps``
steps, so a load change on a shared machine hits both. ``tok/s`` uses the median step time, ``best``
the fastest step. With other processes on the CPUs, multi-threaded steps slow down several-fold (each
OpenMP barrier waits for a descheduled thread); ``--threads 1`` is much steadier there.

Model FLOPs per token are ``r1mega.models.params.flops_per_token(...).training``: 3 x (forward) with
forward = 2 x (decoder matmul weights + output-layer weights) + causal attention (QK^T and AV over
seq/2 keys on average). Embedding lookups, norms, biases, RoPE, softmax and the optimizer are not
counted.

bf16 note: on CPUs without AVX512-BF16/AMX, PyTorch's bf16 GEMM is a slow fallback (tens of times
below fp32), so run bf16 at a small size there; the ceiling used for the fraction is the matmul in
the run's dtype. The HF side in bf16 trains bf16 parameters directly (no fp32 master copy), while
r1mega keeps fp32 master weights and fp32 gradients as megatron does; the report states this.

Example::

    python bench/sft_throughput.py                      # fp32, hidden 512, 4 layers, seq 512, batch 2
    python bench/sft_throughput.py --dtype bf16 --layers 2 --seq-length 128 --micro-batch 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every size has a CPU-friendly default."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    p.add_argument("--ffn", type=int, default=None, help="MLP intermediate size (default 3 x hidden)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads, GQA (default 2)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary, a multiple of 64 (default 8192)")
    p.add_argument("--seq-length", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per step (default 2)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per side per round (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds r1mega/HF (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (default 2)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="parameter/compute dtype")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n x n ceiling matmul")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS", help="profile one more step per side")
    args = p.parse_args(argv)
    args.ffn = args.ffn or 3 * args.hidden
    if args.vocab % 64:
        p.error(f"--vocab={args.vocab} must be a multiple of 64 (megatron pads the vocabulary to 64)")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error(f"--heads={args.heads} must divide --hidden={args.hidden} and be a multiple of --kv-heads")
    return args


# ----------------------------------------------------------------------------- matmul ceiling


def matmul_flops(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 5, budget_s: float = 20.0) -> float:
    """Best FLOP/s of an (m, k) @ (k, n) ``torch.matmul`` in ``dtype`` over ``reps`` tries (fewer if slow)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    start = time.perf_counter()
    torch.matmul(a, b)  # warm-up, and a first estimate
    best = time.perf_counter() - start
    for _ in range(max(0, min(reps, int(budget_s / max(best, 1e-9)) - 1))):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def matmul_ceiling(args: argparse.Namespace, dtype: torch.dtype, tokens: int) -> dict[str, float]:
    """FLOP/s of a square matmul and of the model's three largest GEMM shapes; ``ceiling`` is the best."""
    h, n = args.hidden, args.matmul_size
    qkv = (args.heads + 2 * args.kv_heads) * (h // args.heads)
    shapes = {  # (m, k, n) of the forward GEMMs: tokens x hidden x outputs
        f"square {n}": (n, n, n),
        f"qkv {tokens}x{h}x{qkv}": (tokens, h, qkv),
        f"fc1 {tokens}x{h}x{2 * args.ffn}": (tokens, h, 2 * args.ffn),
        f"logits {tokens}x{h}x{args.vocab}": (tokens, h, args.vocab),
    }
    out = {name: matmul_flops(*shape, dtype) for name, shape in shapes.items()}
    out["ceiling"] = max(out.values())
    return out


# ----------------------------------------------------------------------------- the two sides


def r1mega_overrides(args: argparse.Namespace) -> list[str]:
    """Hydra overrides turning ``model=qwen2_tiny`` into the bench model and batch."""
    return [
        "model=qwen2_tiny",
        f"precision={args.dtype}",
        "precision.transformer_impl=local",
        f"model.hidden_size={args.hidden}",
        f"model.ffn_hidden_size={args.ffn}",
        f"model.num_layers={args.layers}",
        f"model.num_attention_heads={args.heads}",
        f"model.num_query_groups={args.kv_heads}",
        f"model.vocab_size={args.vocab}",
        f"model.max_position_embeddings={max(args.seq_length, 1024)}",
        f"data.seq_length={args.seq_length}",
        f"optim.micro_batch_size={args.micro_batch}",
        f"optim.global_batch_size={args.micro_batch}",  # one micro-batch per step, like the HF loop
        "optim.lr=3e-4",
        "optim.min_lr=3e-4",
        "optim.lr_warmup_steps=0",
        "optim.lr_decay_style=constant",
        "optim.train_steps=100000",
    ]


def fixed_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens with next-token labels; every position carries loss."""
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, vocab, (batch, seq + 1), generator=g)  # (b, s + 1)
    return {
        "tokens": stream[:, :-1].contiguous(),  # (b, s)
        "labels": stream[:, 1:].contiguous(),  # (b, s)
        "loss_mask": torch.ones(batch, seq),  # (b, s)
        "position_ids": torch.arange(seq).unsqueeze(0).expand(batch, -1).contiguous(),  # (b, s)
    }


def build_r1mega(cfg: Any) -> tuple[Any, int]:
    """r1mega's trainer (megatron DDP + optimizer + schedule) and its model's parameter count."""
    from r1mega.models.builder import build_model, transformer_config, unwrap
    from r1mega.train.step import build_trainer

    config = transformer_config(cfg)
    trainer = build_trainer(cfg, config, build_model(cfg, config), 1)
    n_params = sum(p.numel() for p in unwrap(trainer.model[0]).parameters())
    return trainer, n_params


def r1mega_step_fn(trainer: Any, batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    """One r1mega ``train_step`` on ``batch``; returns the loss."""
    from r1mega.train.step import train_step

    def step() -> float:
        return train_step(trainer, iter([batch] * trainer.num_microbatches))["lm_loss"]

    return step


def hf_config(cfg: Any) -> Any:
    """``transformers.Qwen2Config`` with the shape of r1mega's ``cfg.model``."""
    from transformers import Qwen2Config

    m = cfg.model
    return Qwen2Config(
        vocab_size=m.padded_vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.query_groups,
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": m.rotary_base},
        tie_word_embeddings=m.tie_word_embeddings,
        initializer_range=m.init_method_std,
        attention_dropout=0.0,
        use_cache=False,
    )


def build_hf(cfg: Any, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """``Qwen2ForCausalLM`` (sdpa) in ``dtype`` and AdamW with r1mega's hyper-parameters and decay groups."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM._from_config(hf_config(cfg), attn_implementation="sdpa", dtype=dtype)
    model.train()
    o = cfg.optim
    # megatron's default: no weight decay on biases and 1-D parameters (norms).
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.endswith(".bias") or param.ndim == 1 else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_eps,
    )
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    return model, optimizer, n_params


def hf_step_fn(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], clip: float
) -> Callable[[], float]:
    """One plain training step: forward, token-mean loss, backward, clip, AdamW step, zero_grad."""
    tokens, labels = batch["tokens"], batch["labels"]

    def step() -> float:
        logits = model(input_ids=tokens).logits  # (b, s, vocab)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


# ----------------------------------------------------------------------------- timing and report


def time_alternating(
    steps: dict[str, Callable[[], float]], warmup: int, rounds: int, per_round: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm each side up, then alternate timed blocks of steps; returns step times and losses per side."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():
        for _ in range(warmup):
            losses[name].append(step())
    for r in range(rounds):
        for name, step in steps.items():
            for _ in range(per_round):
                start = time.perf_counter()
                losses[name].append(step())
                times[name].append(time.perf_counter() - start)
            recent = " ".join(f"{t:.2f}s" for t in times[name][-per_round:])
            print(f"  round {r + 1}/{rounds} {name:7s} step times {recent}", flush=True)
    return times, losses


def profile_steps(steps: dict[str, Callable[[], float]], rows: int) -> None:
    """One ``torch.profiler`` step per side: the ops with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"\nprofile of one {name} step (self CPU time):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


@dataclass
class SideResult:
    """Throughput of one training loop."""

    name: str
    params: int
    median_step_s: float
    min_step_s: float
    tokens_per_s: float
    """From the median step time."""
    best_tokens_per_s: float
    """From the fastest step (the least disturbed on a shared machine)."""
    model_flops_per_s: float
    """Model FLOPs per token x tokens/s (median)."""
    fraction_of_matmul: float
    """``model_flops_per_s`` over the matmul ceiling."""
    first_loss: float
    last_loss: float


def summarise(
    name: str, times: list[float], losses: list[float], n_params: int, tokens: int, flops_tok: int, ceiling: float
) -> SideResult:
    """Median-step throughput and achieved model FLOP/s of one side."""
    median = statistics.median(times)
    tps = tokens / median
    return SideResult(
        name=name,
        params=n_params,
        median_step_s=median,
        min_step_s=min(times),
        tokens_per_s=tps,
        best_tokens_per_s=tokens / min(times),
        model_flops_per_s=tps * flops_tok,
        fraction_of_matmul=tps * flops_tok / ceiling,
        first_loss=losses[0],
        last_loss=losses[-1],
    )


def print_table(results: list[SideResult]) -> None:
    """One row per side."""
    head = (
        f"{'loop':7s} {'params':>11s} {'median s':>9s} {'min s':>7s} {'tok/s':>8s} {'best':>8s} "
        f"{'GFLOP/s':>8s} {'of mm':>6s} {'loss0':>7s} {'lossN':>7s}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r.name:7s} {r.params:11,d} {r.median_step_s:9.3f} {r.min_step_s:7.3f} {r.tokens_per_s:8.1f} "
            f"{r.best_tokens_per_s:8.1f} {r.model_flops_per_s / 1e9:8.2f} {r.fraction_of_matmul:6.1%} "
            f"{r.first_loss:7.3f} {r.last_loss:7.3f}"
        )


def describe_run(args: argparse.Namespace, cfg: Any, flops: Any, tokens: int) -> None:
    """The model, batch and FLOP count, before anything is timed."""
    m = cfg.model
    print(f"torch {torch.__version__}, {args.threads} thread(s), dtype {args.dtype}")
    print(
        f"model: Qwen2 hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, layers {m.num_layers}, "
        f"heads {m.num_attention_heads}/{m.query_groups} kv, vocab {m.padded_vocab_size}, "
        f"tied {m.tie_word_embeddings}, rope {m.rotary_base:g}; "
        f"batch {args.micro_batch} x seq {args.seq_length} = {tokens} tokens/step"
    )
    print(
        f"model FLOPs/token (training): {flops.training / 1e6:.1f} M = 3 x (weight matmuls {flops.matmul / 1e6:.1f} M"
        f" + causal attention {flops.attention / 1e6:.1f} M)"
    )


def measure_ceiling(args: argparse.Namespace, dtype: torch.dtype, tokens: int) -> tuple[float, float]:
    """Print the matmul FLOP/s; returns (ceiling in the run's dtype, fp32 ceiling)."""
    dtypes = [torch.float32] if dtype == torch.float32 else [torch.float32, dtype]
    ceilings = {}
    for dt in dtypes:
        measured = matmul_ceiling(args, dt, tokens)
        ceilings[dt] = measured["ceiling"]
        parts = ", ".join(f"{name} {v / 1e9:.1f}" for name, v in measured.items() if name != "ceiling")
        print(f"matmul {str(dt).removeprefix('torch.')} GFLOP/s: {parts}; ceiling {ceilings[dt] / 1e9:.1f}")
    return ceilings[dtype], ceilings[torch.float32]


def result_line(args: argparse.Namespace, results: list[SideResult], flops_tok: int, ceiling: float) -> str:
    """The one-line summary a script can grep for."""
    r1, hf = results
    return (
        f"RESULT dtype={args.dtype} r1mega_tok/s={r1.tokens_per_s:.1f} hf_tok/s={hf.tokens_per_s:.1f} "
        f"ratio_r1mega/hf={r1.tokens_per_s / hf.tokens_per_s:.3f} "
        f"ratio_best={r1.best_tokens_per_s / hf.best_tokens_per_s:.3f} model_flops/tok={flops_tok} "
        f"r1mega_GFLOP/s={r1.model_flops_per_s / 1e9:.2f} ({r1.fraction_of_matmul:.1%} of matmul) "
        f"hf_GFLOP/s={hf.model_flops_per_s / 1e9:.2f} ({hf.fraction_of_matmul:.1%} of matmul) "
        f"matmul_GFLOP/s={ceiling / 1e9:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the ceiling, both loops, and print (and optionally save) the comparison."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")  # Apex/TE fallbacks
    torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype]
    from r1mega.config.load import compose_config
    from r1mega.models.params import flops_per_token
    from r1mega.parallel.bootstrap import single_process

    cfg = compose_config(r1mega_overrides(args))
    tokens = args.micro_batch * args.seq_length
    flops = flops_per_token(cfg.model, args.seq_length)
    describe_run(args, cfg, flops, tokens)
    ceiling, ceil_fp32 = measure_ceiling(args, dtype, tokens)
    batch = fixed_batch(args.micro_batch, args.seq_length, cfg.model.padded_vocab_size)
    with single_process(cfg):
        trainer, r1_params = build_r1mega(cfg)
        hf_model, hf_opt, hf_params = build_hf(cfg, dtype)
        print(f"parameters: r1mega {r1_params:,d}  HF {hf_params:,d}")
        if r1_params != hf_params:
            print("error: the two models differ in size, so they would not do the same work", file=sys.stderr)
            return 1
        steps = {
            "r1mega": r1mega_step_fn(trainer, batch),
            "hf": hf_step_fn(hf_model, hf_opt, batch, cfg.optim.clip_grad),
        }
        times, losses = time_alternating(steps, args.warmup, args.rounds, args.steps)
        if args.profile:
            profile_steps(steps, args.profile)
    results = [
        summarise(name, times[name], losses[name], n, tokens, flops.training, ceiling)
        for name, n in (("r1mega", r1_params), ("hf", hf_params))
    ]
    print()
    print_table(results)
    print(result_line(args, results, flops.training, ceiling))
    if args.json is not None:
        payload = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "matmul_flops_per_s": ceiling,
            "matmul_fp32_flops_per_s": ceil_fp32,
            "model_flops_per_token": flops.training,
            "tokens_per_step": tokens,
            "ratio": results[0].tokens_per_s / results[1].tokens_per_s,
            "ratio_best": results[0].best_tokens_per_s / results[1].best_tokens_per_s,
            "sides": [asdict(r) for r in results],
            "step_times_s": times,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0 if all(math.isfinite(r.last_loss) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
