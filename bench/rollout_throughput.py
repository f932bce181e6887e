"""Rollout throughput: r1mega's engine against Hugging Face ``generate`` and against the decode step's matmul
floor, on the same weights, in one run.

One process builds a dense Qwen2-architecture model through r1mega (megatron-core local layers), copies its
weights into ``transformers.Qwen2ForCausalLM`` with r1mega's Qwen2 state-dict adapter, checks that both decode
the same greedy tokens, then times sampling (T=0.6, top-p 0.95; prompts of 16-48 tokens, up to 128 new tokens)
for each batch size (``--batch``, default 16 and 64) and each length mix (``--lengths``):

- ``fixed``: one batch of prompts, every completion runs the full ``--new-tokens`` (``ignore_eos`` /
  ``min_new_tokens``), so every side does the same work;
- ``varied``: ``--prompts-per-row`` x batch prompts whose responses end at a block of stop tokens on every side
  (mean ``--mean-length`` tokens, cut at ``--new-tokens``): the varied lengths of real rollouts.

Sides, each holding at most ``batch`` rows at once: **r1mega** (the engine's default loop, one ``generate`` per
batch of prompts; finished rows are dropped, never replaced), **r1mega CB** (continuous batching:
``max_batch=batch``, finished rows replaced by waiting prompts), **HF** (``generate`` per batch of prompts,
default dynamic cache, ``attn_implementation="sdpa"``; a finished row keeps costing compute until its batch
ends) and the **floor** (``rollout_floor.MatmulFloor``: the decode step's weight matmuls alone at the same
shapes). On the CPU, **r1mega compiled** and **CB compiled** are the same two loops with compiled decode
steps (``RolloutEngine(compiled=True)``, ``grpo.rollout_compile``; ``--no-compiled`` leaves them out); their
compilation happens in the warm-up and its time is reported (``compile_warmup_s``). The **step floor**
(``rollout_floor.StepFloor``) is a step's matmuls in the step's order: each layer's weights with its attention's
products against the cache between them (``rollout_floor.AttentionFloor``, at the mean length the CB side's tokens
attended): the read of the cache, which the floor leaves out, and what it costs the weights' products that follow
it. The **work floor** adds the prompts' prefill matmuls (``rollout_floor.PrefillFloor``) to the step floor's time
for the tokens a side generated: the matmuls of all the work it did. ``work floor / floor`` is then the most of
the floor any side doing that work could reach. Throughput counts generated (useful) tokens; the sides and the
floors alternate over ``--rounds`` so a load change on a shared machine hits all of them, and medians are
reported. The MoE+MLA model (DeepSeek-V3 shaped, hidden 512) gets the same table without HF.

With ``--mtp-checkpoint``/``--mtp-data`` (defaults: the tiny pipeline's cold-start SFT, when present) it also
measures MTP speculative decoding and the bf16 engine/trainer log-probability gap on that policy
(``rollout_mtp``). The load average before and after is printed: other work on the machine slows every side;
on a shared machine ``--threads 1 --clock cpu`` times each side by this process's CPU time instead, which other
processes hardly change.

On a GPU (``--device cuda``, bf16 by default) the dense fixed-length comparison also runs r1mega with CUDA-graph
decode steps and the memory-bound floor (``rollout_floor.decode_floor``); the last line, ``ROLLOUT_GPU {json}``,
is the machine-readable summary.

Example::

    python bench/rollout_throughput.py                  # the CPU table: batch 16 and 64, fixed and varied
    python bench/rollout_throughput.py --preset h200    # cuda, bf16, hidden 2048, 16 layers, batch 64, 256 new
    python bench/rollout_throughput.py --device cpu --hidden 64 --layers 2 --ffn 128 --vocab 512 --batch 4 \\
        --new-tokens 8 --rounds 1 --skip-moe --floor   # the GPU code path's smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Any

import torch
from rollout_floor import (
    AttentionFloor,
    MatmulFloor,
    PrefillFloor,
    StepFloor,
    copy_bandwidth,
    decode_floor,
    mean_attended,
)

QWEN = [
    "model=qwen2_tiny",
    "model.num_layers={layers}",
    "model.hidden_size={hidden}",
    "model.ffn_hidden_size={ffn}",
    "model.num_attention_heads={heads}",
    "model.num_query_groups={groups}",
    "model.vocab_size={vocab}",
]
PRESETS = {
    "h200": dict(device="cuda", dtype="bf16", hidden=2048, layers=16, ffn=5632, heads=16, groups=4, vocab=32000,
                 batch=[64], lengths=["fixed"], prompt_min=64, prompt_max=128, new_tokens=256, rounds=3),
}  # fmt: skip
"""Named sizes: ``--preset h200`` is the GPU issue's measurement (~0.8B parameters, bf16)."""
DSV3 = [
    "model=dsv3_tiny",
    "model.num_layers=4",
    "model.hidden_size={hidden}",
    "model.ffn_hidden_size={ffn}",
    "model.num_attention_heads=8",
    "model.q_lora_rank=192",
    "model.kv_lora_rank=128",
    "model.qk_head_dim=64",
    "model.qk_pos_emb_head_dim=32",
    "model.v_head_dim=64",
    "model.num_experts=8",
    "model.moe_ffn_hidden_size=256",
    "model.moe_shared_expert_intermediate_size=256",
    "model.mtp_num_layers=0",
    "model.vocab_size={vocab}",
]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named size (its values replace the defaults)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: fp32 on the CPU, bf16 on CUDA")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=2, help="query groups (GQA)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=_ints, default=[16, 64], help="batch sizes (rows at once), comma-separated")
    p.add_argument("--lengths", type=lambda s: s.split(","), default=["fixed", "varied"], help="fixed,varied")
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--mean-length", type=int, default=40, help="mean response length of the varied mix")
    p.add_argument("--prompts-per-row", type=int, default=4, help="varied mix: prompts = this x batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (with --threads 1: stable ratios on a loaded machine)",
    )
    p.add_argument("--skip-moe", action="store_true", help="only the dense model")
    p.add_argument(
        "--no-compiled",
        dest="compiled",
        action="store_false",
        help="leave out the sides with compiled decode steps (CPU; RolloutEngine(compiled=True))",
    )
    p.add_argument("--floor", action="store_true", help="also the memory-bound floor and ROLLOUT_GPU (on with cuda)")
    p.add_argument("--mtp-checkpoint", default="runs/pipeline/cold_start_sft", help="cold-start SFT run (MTP trained)")
    p.add_argument("--mtp-data", default="data/cold_start_easy", help="its data folder (tokenizer, eval prompts)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.preset:
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)  # explicit options still win over the preset
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.floor = args.floor or args.device == "cuda"
    args.compiled = args.compiled and args.device == "cpu"  # on CUDA the decode step runs as CUDA graphs
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        p.error("--clock cpu measures this process's CPU time: use it with --device cpu --threads 1")
    return args


# ---- workloads and sides ------------------------------------------------------------------------------------


def _prompts(args: argparse.Namespace, n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(args.prompt_min, args.prompt_max + 1, (n,), generator=g).tolist()
    return [torch.randint(10, args.vocab, (k,), generator=g).tolist() for k in lengths]


def _stop_ids(args: argparse.Namespace) -> tuple[int, ...]:
    """Token ids that end a response: an untrained model samples nearly uniformly, so k of V ids end a
    response with probability ~k/V per token (a geometric length with mean ~V/k, cut at --new-tokens)."""
    return tuple(range(10, 10 + max(args.vocab // args.mean_length, 1)))


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _hf_model(cfg: Any, model: torch.nn.Module) -> torch.nn.Module:
    """``transformers.Qwen2ForCausalLM`` holding ``model``'s weights (through r1mega's adapter), on the same
    device and in the same dtype."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1mega.convert.convert import make_adapter

    param = next(model.parameters())
    adapter = make_adapter(cfg.model)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    with param.device:  # built (and randomly initialised) where it will run
        hf = Qwen2ForCausalLM(Qwen2Config(**adapter.hf_config(), attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(adapter.to_hf_state_dict(state), strict=False)
    missing = [k for k in missing if not (hf.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight copy failed: missing {missing}, unexpected {unexpected}")
    return hf.to(param.dtype).eval()


def _hf_generate(
    hf: torch.nn.Module, prompts: list[list[int]], new_tokens: int, sample: bool, stop: tuple[int, ...] = ()
) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as HF recommends for decoder-only generation
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    kwargs = dict(do_sample=True, temperature=0.6, top_p=0.95, top_k=0) if sample else dict(do_sample=False)
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids.to(hf.device),
            attention_mask=mask.to(hf.device),
            max_new_tokens=new_tokens,
            min_new_tokens=0 if stop else new_tokens,
            eos_token_id=list(stop) if stop else None,
            pad_token_id=0,
            **kwargs,
        )
    return out[:, width:].tolist()


def _length(row: list[int], stop: tuple[int, ...]) -> int:
    """Generated tokens of an HF row up to and including its first stop token (the rest is padding)."""
    for i, tok in enumerate(row):
        if tok in stop:
            return i + 1
    return len(row)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _clock(args: argparse.Namespace) -> Any:
    """The benchmark's clock: elapsed time, or this process's CPU time (``--clock cpu``)."""
    return time.process_time if args.clock == "cpu" else time.perf_counter


def _time(fn: Any, clock: Any = time.perf_counter) -> float:
    _sync()
    t0 = clock()
    fn()
    _sync()
    return clock() - t0


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of token positions where two greedy runs agree before their first difference, per row."""
    same = 0
    for x, y in zip(a, b, strict=True):
        same += next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
    return same / max(sum(len(x) for x in a), 1)


def measure(
    args: argparse.Namespace, model: torch.nn.Module, batch: int, lengths: str, hf: Any = None
) -> dict[str, Any]:
    """One cell of the table: tokens/s of every side and of the floor at ``batch`` rows for one length mix."""
    from r1mega.rollout import RolloutEngine, SamplingParams

    varied = lengths == "varied"
    prompts = _prompts(args, args.prompts_per_row * batch if varied else batch)
    stop = _stop_ids(args) if varied else ()
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=args.new_tokens, ignore_eos=True,
                            stop_token_ids=stop)  # fmt: skip
    engines = {
        "r1mega": RolloutEngine([model], cuda_graphs=False),
        "r1mega_cb": RolloutEngine([model], max_batch=batch),
    }
    if args.compiled:  # the same two loops with compiled decode steps (CPU)
        engines["r1mega_compiled"] = RolloutEngine([model], cuda_graphs=False, compiled=True)
        engines["r1mega_cb_compiled"] = RolloutEngine([model], max_batch=batch, compiled=True)
    if args.device == "cuda" and not varied:  # dense, and MoE in bf16 on Hopper (grouped experts)
        engines["r1mega_graphs"] = RolloutEngine([model], cuda_graphs=True)

    # Each run returns the length of every response, in the prompts' order.
    def default_loop(engine: Any) -> list[int]:
        return [len(c.token_ids) for chunk in _chunks(prompts, batch) for c in engine.generate(chunk, params)]

    def one_call(engine: Any) -> list[int]:  # continuous batching: every prompt in one call
        return [len(c.token_ids) for c in engine.generate(prompts, params)]

    runs: dict[str, Any] = {k: (lambda e=e: (one_call if e.max_batch else default_loop)(e)) for k, e in engines.items()}
    if hf is not None:
        runs["hf"] = lambda: [
            _length(row, stop)
            for chunk in _chunks(prompts, batch)
            for row in _hf_generate(hf, chunk, args.new_tokens, True, stop)
        ]
    warmup: dict[str, float] = {}
    prompt_lengths = [len(p) for p in prompts]
    floor = MatmulFloor(model, batch, clock=_clock(args))
    prefill = PrefillFloor(model, prompt_lengths, batch, clock=_clock(args))
    mean_prompt = round(statistics.mean(prompt_lengths))
    attention = AttentionFloor(model, batch, mean_prompt, args.prompt_max + args.new_tokens, clock=_clock(args))
    step = StepFloor(floor, attention)
    if args.device == "cuda":
        for fn in runs.values():  # warm-up: CUDA graphs captured, kernels and allocator warmed
            fn()
    else:  # warm-up on a small call: code paths, caches, the allocator, compilation (2 rows and 1)
        small = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=4)
        for k, engine in engines.items():
            t0 = time.perf_counter()
            engine.generate(prompts[:2], small)
            engine.generate(prompts[:1], small)
            warmup[k] = time.perf_counter() - t0
        if hf is not None:
            _hf_generate(hf, prompts[:2], 4, True)
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    tokens: dict[str, list[int]] = {k: [] for k in runs}
    rows: dict[str, list[int]] = {}  # each side's response lengths (its last run)

    def run(k: str) -> None:
        rows[k] = runs[k]()
        tokens[k].append(sum(rows[k]))

    for _ in range(args.rounds):  # the sides and the floors alternate so a load change hits all of them
        for k in runs:
            seconds[k].append(_time(lambda k=k: run(k), _clock(args)))
            floor.time()
            attention.time()
            step.time()
        prefill.time()
    tok_s = {k: 1 / statistics.median(t / n for t, n in zip(seconds[k], tokens[k], strict=True)) for k in runs}
    # A side's step floor: a step's matmuls, the weights' and the attention's, in the step's order, at the mean
    # length its tokens attended; its work floor: the step floor's time for each token it generated plus every
    # prompt's prefill.
    attended = {k: mean_attended(prompt_lengths, rows[k]) for k in runs}
    step_s = {k: step.at(attended[k]) for k in runs}
    work_s = {k: statistics.median(tokens[k]) * step_s[k] / batch + prefill.median for k in runs}
    work_of = {k: work_s[k] * tok_s[k] / statistics.median(tokens[k]) for k in runs}
    long = attention.lengths[1]
    out: dict[str, Any] = {
        "batch": batch, "lengths": lengths, "prompts": len(prompts), "floor_tok_s": floor.tok_s,
        "floor_gflop_s": floor.flops * floor.tok_s / batch / 1e9,
        "mean_length": {k: statistics.mean(tokens[k]) / len(prompts) for k in runs},
        "mean_attended": attended,
        **{f"{k}_tok_s": v for k, v in tok_s.items()},
        **{f"{k}_of_floor": v / floor.tok_s for k, v in tok_s.items()},
        "prefill_floor_s": prefill.median,
        "attention_floor_s": attention.at(attended["r1mega_cb"]),
        "step_floor_s": step_s["r1mega_cb"],
        "weights_and_attention_apart_s": statistics.median(floor.seconds) + attention.at(attended["r1mega_cb"]),
        "attention_floor_gb_s": attention.bytes_per_position * long / attention.at(long) / 1e9,
        "step_floor_tok_s": batch / step_s["r1mega_cb"],
        "work_floor_tok_s": statistics.median(tokens["r1mega_cb"]) / work_s["r1mega_cb"],
        "compile_warmup_s": warmup,
        **{f"{k}_of_work_floor": v for k, v in work_of.items()},
        "seconds": seconds,
    }  # fmt: skip
    # The most of the floor a side could reach doing the CB side's work at the work floor (the target's ceiling).
    out["ceiling_of_floor"] = out["work_floor_tok_s"] / floor.tok_s
    if hf is not None:
        out["cb_vs_hf"], out["r1mega_vs_hf"] = tok_s["r1mega_cb"] / tok_s["hf"], tok_s["r1mega"] / tok_s["hf"]
    if "r1mega_graphs" in engines:
        out["graphs"] = {"on": engines["r1mega_graphs"].cuda_graphs,
                         "captured": engines["r1mega_graphs"].stats.extra.get("graphs_captured", 0)}  # fmt: skip
    out["cache_bytes_per_token"] = engines["r1mega"].stats.cache_bytes_per_token
    return out


# ---- models -------------------------------------------------------------------------------------------------


def dense(args: argparse.Namespace) -> dict[str, Any]:
    """The dense table (r1mega, r1mega CB, HF, floor), the greedy check against HF and, on a GPU, the
    bandwidth floor."""
    from r1mega.config.load import compose_config
    from r1mega.models.builder import build_model
    from r1mega.parallel.bootstrap import single_process
    from r1mega.rollout import RolloutEngine, SamplingParams

    fmt = dict(hidden=args.hidden, layers=args.layers, ffn=args.ffn, vocab=args.vocab, heads=args.heads,
               groups=args.groups)  # fmt: skip
    overrides = [o.format(**fmt) for o in QWEN] + [f"precision={args.dtype}"]
    if args.prompt_max + args.new_tokens > 1024:
        overrides.append(f"model.max_position_embeddings={args.prompt_max + args.new_tokens}")
    cfg = compose_config(overrides)
    with single_process(cfg):
        torch.manual_seed(0)
        model = build_model(cfg)[0].eval()
        hf = _hf_model(cfg, model)
        check = _prompts(args, 4)
        greedy = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
        ours = [c.token_ids for c in RolloutEngine([model]).generate(check, greedy)]
        theirs = _hf_generate(hf, check, 16, sample=False)
        out: dict[str, Any] = {
            "model": "qwen2-architecture", "device": args.device, "dtype": args.dtype,
            "params": sum(p.numel() for p in model.parameters()), "overrides": overrides,
            "greedy_tokens_identical": ours == theirs, "greedy_token_agreement": _agreement(ours, theirs),
            "cells": [measure(args, model, b, lengths, hf) for b in args.batch for lengths in args.lengths],
        }  # fmt: skip
        if args.floor:
            out.update(_gpu_report(args, model, out["cells"][0], check))
        return out


def _gpu_report(
    args: argparse.Namespace, model: torch.nn.Module, cell: dict[str, Any], check: list[list[int]]
) -> dict[str, Any]:
    """The memory-bound floor of the first (fixed-length) cell, the CUDA-graph side and the fractions reached."""
    from r1mega.rollout import RolloutEngine, SamplingParams

    device = next(model.parameters()).device
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(device, nbytes=(2 << 30) if device.type == "cuda" else (64 << 20))
    prompts = _prompts(args, cell["batch"])
    floor_s = decode_floor(weight_bytes, cell["cache_bytes_per_token"], [len(p) for p in prompts], args.new_tokens, bw)
    floor_tok_s = cell["batch"] * args.new_tokens / floor_s if cell["lengths"] == "fixed" else None
    out: dict[str, Any] = {"graphs_on": False, "graphs_captured": 0}
    if "r1mega_graphs_tok_s" in cell:
        greedy = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
        eager = [c.token_ids for c in RolloutEngine([model], cuda_graphs=False).generate(check, greedy)]
        graphed = [c.token_ids for c in RolloutEngine([model], cuda_graphs=True).generate(check, greedy)]
        out = {
            "graphs_on": cell["graphs"]["on"], "graphs_captured": cell["graphs"]["captured"],
            "graphs_greedy_equal_eager": graphed == eager, "graphs_greedy_agreement": _agreement(graphed, eager),
            "r1mega_graphs_tok_s": cell["r1mega_graphs_tok_s"],
            "graphs_vs_hf": cell["r1mega_graphs_tok_s"] / cell["hf_tok_s"],
            "graphs_vs_eager": cell["r1mega_graphs_tok_s"] / cell["r1mega_tok_s"],
            "floor_fraction_graphs": cell["r1mega_graphs_tok_s"] / floor_tok_s if floor_tok_s else None,
        }  # fmt: skip
    return {
        **out,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_gb_s": bw / 1e9,
        "floor_tok_s": floor_tok_s,
        "floor_fraction_eager": cell["r1mega_tok_s"] / floor_tok_s if floor_tok_s else None,
        "floor_fraction_hf": cell["hf_tok_s"] / floor_tok_s if floor_tok_s else None,
    }


def moe_mla(args: argparse.Namespace) -> dict[str, Any]:
    """The MoE+MLA table (r1mega, r1mega CB, floor) and the latent cache's size against MHA's."""
    from r1mega.config.load import compose_config
    from r1mega.models.builder import build_model
    from r1mega.parallel.bootstrap import single_process
    from r1mega.rollout.kv_cache import CacheLayout

    overrides = [o.format(hidden=args.hidden, ffn=args.ffn, vocab=args.vocab) for o in DSV3]
    cfg = compose_config([*overrides, f"precision={args.dtype}"])
    with single_process(cfg):
        torch.manual_seed(0)
        model = build_model(cfg)[0].eval()
        layout, elem = CacheLayout.of(model.config), next(model.parameters()).element_size()
        return {
            "model": "deepseek-v3-architecture (MLA + MoE)",
            "params": sum(p.numel() for p in model.parameters()),
            "overrides": overrides,
            "cells": [measure(args, model, b, lengths) for b in args.batch for lengths in args.lengths],
            "cache_bytes_per_token_per_layer": layout.values_per_token * elem,
            "mha_bytes_per_token_per_layer": layout.mha_values_per_token * elem,
            "cache_fraction_of_mha": layout.values_per_token / layout.mha_values_per_token,
        }


# ---- report -------------------------------------------------------------------------------------------------


SIDES = ("r1mega", "r1mega_compiled", "r1mega_cb", "r1mega_cb_compiled", "hf", "floor", "step_floor", "work_floor")
"""The tokens/s columns of the table, in order."""


def table(results: dict[str, Any]) -> str:
    """Two Markdown tables of every cell: tokens/s of each side and floor, then the shares and ratios."""

    def pct(c: dict[str, Any], key: str) -> str:
        return f"{100 * c[key]:.0f}%" if key in c else "-"

    def num(c: dict[str, Any], key: str, fmt: str = "{:.0f}") -> str:
        return fmt.format(c[key]) if key in c else "-"

    def ratio(c: dict[str, Any], a: str, b: str) -> str:
        return f"{c[a] / c[b]:.2f}x" if a in c and b in c else "-"

    speed = [
        "| model | batch | lengths | r1mega | r1mega compiled | CB | CB compiled | HF | floor | step floor | work floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shares = [
        "| model | batch | lengths | r1mega / floor | r1mega compiled / floor | CB / floor | CB compiled / floor "
        "| HF / floor | work floor / floor | CB compiled / work floor | CB / HF | CB compiled / HF "
        "| compiled / eager (CB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, name in (("dense", "dense"), ("moe_mla", "MoE+MLA")):
        for c in results.get(key, {}).get("cells", []):
            head = [name, str(c["batch"]), c["lengths"]]
            speed.append("| " + " | ".join(head + [num(c, f"{k}_tok_s") for k in SIDES]) + " |")
            shares.append("| " + " | ".join(head + [
                pct(c, "r1mega_of_floor"), pct(c, "r1mega_compiled_of_floor"), pct(c, "r1mega_cb_of_floor"),
                pct(c, "r1mega_cb_compiled_of_floor"), pct(c, "hf_of_floor"), pct(c, "ceiling_of_floor"),
                pct(c, "r1mega_cb_compiled_of_work_floor"),
                ratio(c, "r1mega_cb_tok_s", "hf_tok_s"), ratio(c, "r1mega_cb_compiled_tok_s", "hf_tok_s"),
                ratio(c, "r1mega_cb_compiled_tok_s", "r1mega_cb_tok_s")]) + " |")  # fmt: skip
    return "tokens/s\n\n" + "\n".join(speed) + "\n\nshares of the floors and ratios\n\n" + "\n".join(shares)


def _print_mtp(results: dict[str, Any]) -> None:
    for r in results.get("speculative", []):
        print(
            f"  MTP speculative, batch {r['batch']}, {r['sampling']}: plain {r['plain_tok_s']:.0f} tok/s, "
            f"speculative {r['spec_tok_s']:.0f} tok/s ({r['speedup']:.2f}x), acceptance {100 * r['acceptance_rate']:.1f}%"
            f", sequences identical to plain {r['identical']}/{r['rows']}"
        )
    for r in results.get("bf16_gap", []):
        print(
            f"  bf16 engine vs trainer log-probs, {r['model']} ({r['tokens']} tokens, T=1): |gap| mean "
            f"{r['rollout_logp_gap']:.2e}, max {r['rollout_logp_gap_max']:.2e}; TIS (cap 2) mean weight "
            f"{r['rollout_is_mean']:.4f}, truncated {100 * r['rollout_is_clipfrac']:.2f}%"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print a report (and JSON with ``--json``)."""
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA initialises: every side runs on the CPU
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU visible to torch; use --device cpu here")
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "load_before": load}
    results["dense"] = d = dense(args)
    print(
        f"dense {d['params'] / 1e6:.1f}M params ({d['dtype']}, {d['device']}): same greedy tokens as HF: "
        f"{d['greedy_tokens_identical']} (agreement {d['greedy_token_agreement']:.2f})"
    )
    if not args.skip_moe:
        results["moe_mla"] = m = moe_mla(args)
        print(
            f"MoE+MLA {m['params'] / 1e6:.1f}M params: latent cache {m['cache_bytes_per_token_per_layer']} B/token/layer"
            f" vs {m['mha_bytes_per_token_per_layer']} B for MHA ({100 * m['cache_fraction_of_mha']:.1f}%)"
        )
        graphed = [c for c in m["cells"] if "r1mega_graphs_tok_s" in c]
        for c in graphed:  # on CUDA
            print(
                f"  MoE+MLA batch {c['batch']}: eager {c['r1mega_tok_s']:.0f} tok/s, CUDA graphs "
                f"{c['r1mega_graphs_tok_s']:.0f} tok/s ({c['r1mega_graphs_tok_s'] / c['r1mega_tok_s']:.2f}x; on: "
                f"{c['graphs']['on']}, {c['graphs']['captured']} graphs)"
            )
    if args.device == "cpu" and os.path.isdir(args.mtp_checkpoint) and os.path.isdir(args.mtp_data):
        import rollout_mtp

        results["speculative"] = rollout_mtp.speculative(
            args.mtp_checkpoint, args.mtp_data, args.batch, args.rounds, args.new_tokens, _clock(args)
        )
        results["bf16_gap"] = rollout_mtp.logprob_gap(args.mtp_checkpoint, args.mtp_data, 64)
    results["load_after"] = os.getloadavg()
    print(
        f"=== rollout tokens/s ({results['threads']} threads, {args.clock} clock; prompts {args.prompt_min}-{args.prompt_max} tokens, "
        f"up to {args.new_tokens} new, T=0.6 top-p 0.95; varied: mean ~{args.mean_length} tokens, "
        f"{args.prompts_per_row} prompts per row; load average {load[0]:.1f} before, {results['load_after'][0]:.1f} after)"
    )
    print(table(results))
    _print_mtp(results)
    if args.floor:
        _print_gpu(d, results.get("moe_mla"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _print_gpu(d: dict[str, Any], moe: dict[str, Any] | None = None) -> None:
    """The bandwidth-floor line and the ``ROLLOUT_GPU`` summary (with the MoE+MLA model's eager and graph
    tokens/s when it ran)."""
    floor, pct = d["floor_tok_s"], lambda k: "n/a" if d.get(k) is None else f"{100 * d[k]:.1f}%"
    print(
        f"  bandwidth floor: {d['weight_bytes'] / 1e9:.2f} GB weights + cache at {d['copy_bandwidth_gb_s']:.0f} GB/s "
        f"-> {'n/a' if floor is None else f'{floor:.0f} tok/s'}; reached: graphs {pct('floor_fraction_graphs')}, "
        f"eager {pct('floor_fraction_eager')}, HF {pct('floor_fraction_hf')}"
    )
    cell = d["cells"][0]
    keys = ("device", "dtype", "params", "r1mega_graphs_tok_s", "graphs_vs_hf", "graphs_vs_eager", "graphs_on",
            "graphs_captured", "graphs_greedy_equal_eager", "greedy_token_agreement", "copy_bandwidth_gb_s",
            "floor_tok_s", "floor_fraction_graphs", "floor_fraction_eager", "floor_fraction_hf")  # fmt: skip
    summary = {"batch": cell["batch"], **{k: d.get(k) for k in keys}}
    summary.update({k: cell.get(k) for k in ("r1mega_tok_s", "r1mega_cb_tok_s", "hf_tok_s", "r1mega_vs_hf")})
    summary["ratio"] = cell.get("r1mega_vs_hf")
    summary["matmul_floor_tok_s"] = cell["floor_tok_s"]
    if moe is not None:
        first = moe["cells"][0]
        summary["moe_params"] = moe["params"]
        summary.update({f"moe_{k}": first.get(k) for k in ("r1mega_tok_s", "r1mega_graphs_tok_s", "graphs")})
    print("ROLLOUT_GPU " + json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
