"""Rollout throughput: r1mega's engine against Hugging Face ``generate`` on the same weights, in one run.

One process builds a dense Qwen2-architecture model through r1mega (megatron-core local layers), copies
its weights into ``transformers.Qwen2ForCausalLM`` with r1mega's Qwen2 state-dict adapter, checks that
both decode the same greedy tokens, then times batched sampling on both with the same prompts and
settings (default: batch 16, prompts of 16-48 tokens, 128 new tokens, T=0.6, top-p 0.95; every
completion runs the full 128 tokens, ``ignore_eos`` / ``min_new_tokens``, so both sides do the same
work; ``--mean-length N`` instead ends responses at a block of stop tokens on both sides, giving the varied
lengths of real rollouts, where finished rows stop costing r1mega compute but not HF). Throughput counts
generated (useful) tokens. HF uses its default dynamic KV cache and ``attn_implementation="sdpa"``. The two sides alternate
over ``--rounds`` so a load change on a shared machine hits both; the median is reported.

It also measures the MoE+MLA model (a DeepSeek-V3-shaped model at hidden 512): tokens/s and the latent
cache's bytes per token against what standard multi-head attention would cache for the same model.

On a GPU (``--device cuda``, bf16 by default) the dense comparison has three sides: r1mega with eager decode
steps, r1mega replaying CUDA-graph decode steps, and HF ``generate`` (dynamic cache, sdpa, bf16). It also
prints the memory-bound floor: a decode step reads every weight once plus each row's KV cache up to its
position, so ``floor seconds = sum over steps of (weight bytes + cache bytes read) / bandwidth``, with the
bandwidth of a large device-to-device copy measured in the same run (read + write bytes); tokens/s at that
floor and the fraction each side reaches (prefill, sampling and logits traffic are not in the floor). The last
line, ``ROLLOUT_GPU {json}``, is the machine-readable summary.

Example::

    python bench/rollout_throughput.py                 # hidden 512, 8 layers, batch 16, 128 new tokens
    python bench/rollout_throughput.py --threads 1 --rounds 5
    python bench/rollout_throughput.py --preset h200   # cuda, bf16, hidden 2048, 16 layers, batch 64, 256 new
    python bench/rollout_throughput.py --device cpu --hidden 64 --layers 2 --ffn 128 --vocab 512 --batch 4 \
        --new-tokens 8 --rounds 1 --skip-moe           # the GPU code path's smoke test on a CPU
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
                 batch=64, prompt_min=64, prompt_max=128, new_tokens=256, rounds=3),
}  # fmt: skip
"""Named sizes: ``--preset h200`` is the issue's GPU measurement (~0.8B parameters, bf16)."""
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
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--mean-length",
        type=int,
        default=0,
        help="0: every completion runs the full --new-tokens; N: responses of varied length, ~N tokens on average "
        "(a block of the vocabulary ends a response on both sides, so lengths follow the same distribution)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--skip-moe", action="store_true", help="only the dense comparison")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also measure the memory-bound floor and print the ROLLOUT_GPU summary (always on with --device cuda)",
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.preset:
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)  # explicit options still win over the preset
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.floor = args.floor or args.device == "cuda"
    return args


def _prompts(args: argparse.Namespace) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.prompt_min, args.prompt_max + 1, (args.batch,), generator=g).tolist()
    return [torch.randint(10, args.vocab, (n,), generator=g).tolist() for n in lengths]


def _stop_ids(args: argparse.Namespace) -> tuple[int, ...]:
    """Token ids that end a response: an untrained model samples nearly uniformly, so k of V ids end a
    response with probability ~k/V per token (a geometric length with mean ~V/k, cut at --new-tokens)."""
    if not args.mean_length:
        return ()
    k = max(args.vocab // args.mean_length, 1)
    return tuple(range(10, 10 + k))


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


def _time(fn: Any) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, repeats: int = 20) -> float:
    """Device memory bandwidth in bytes/s: a large device-to-device copy, counting bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if device.type != "cuda":
        return 2 * nbytes * repeats / _time(lambda: [dst.copy_(src) for _ in range(repeats)])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * nbytes * repeats / (start.elapsed_time(end) / 1e3)


def decode_floor(weight_bytes: int, cache_bytes_per_token: float, lengths: list[int], steps: int, bw: float) -> float:
    """Seconds for ``steps`` decode steps if each read every weight once plus each row's cache up to its
    position (``lengths``: prompt lengths) at ``bw`` bytes/s."""
    cached = sum(n + t for t in range(steps) for n in lengths)  # cached tokens read over all steps
    return (steps * weight_bytes + cached * cache_bytes_per_token) / bw


def _build_dense(args: argparse.Namespace) -> tuple[Any, list[str]]:
    from r1mega.config.load import compose_config

    fmt = dict(hidden=args.hidden, layers=args.layers, ffn=args.ffn, vocab=args.vocab, heads=args.heads,
               groups=args.groups)  # fmt: skip
    overrides = [o.format(**fmt) for o in QWEN] + [f"precision={args.dtype}"]
    if args.prompt_max + args.new_tokens > 1024:
        overrides.append(f"model.max_position_embeddings={args.prompt_max + args.new_tokens}")
    return compose_config(overrides), overrides


def dense(args: argparse.Namespace) -> dict[str, Any]:
    """r1mega engine (eager steps, and CUDA-graph steps on a GPU) vs HF generate on the same dense weights."""
    from r1mega.models.builder import build_model
    from r1mega.parallel.bootstrap import single_process
    from r1mega.rollout import RolloutEngine, SamplingParams

    cfg, overrides = _build_dense(args)
    prompts = _prompts(args)
    with single_process(cfg) as ctx:
        torch.manual_seed(0)
        model = build_model(cfg)[0].eval()
        params = sum(p.numel() for p in model.parameters())
        hf = _hf_model(cfg, model)
        engines = {"r1mega": RolloutEngine([model], cuda_graphs=False)}
        if ctx.device.type == "cuda":
            engines["r1mega_graphs"] = RolloutEngine([model], cuda_graphs=True)
        check = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
        greedy = {k: [c.token_ids for c in e.generate(prompts[:4], check)] for k, e in engines.items()}
        hf_greedy = _hf_generate(hf, prompts[:4], 16, sample=False)
        stop = _stop_ids(args)
        sampling = SamplingParams(
            temperature=0.6, top_p=0.95, max_new_tokens=args.new_tokens, ignore_eos=True, stop_token_ids=stop
        )

        def ours(engine: Any) -> int:
            return sum(len(c.token_ids) for c in engine.generate(prompts, sampling))

        def theirs() -> int:
            return sum(_length(row, stop) for row in _hf_generate(hf, prompts, args.new_tokens, True, stop))

        runs: dict[str, Any] = {**{k: (lambda e=e: ours(e)) for k, e in engines.items()}, "hf": theirs}
        if ctx.device.type == "cuda":
            for fn in runs.values():  # warm-up: CUDA graphs captured, kernels and allocator warmed
                fn()
        seconds: dict[str, list[float]] = {k: [] for k in runs}
        tokens: dict[str, list[int]] = {k: [] for k in runs}
        for _ in range(args.rounds):  # the sides alternate so a load change hits all of them
            for k, fn in runs.items():
                seconds[k].append(_time(lambda fn=fn, k=k: tokens[k].append(fn())))
        tok_s = {k: 1 / statistics.median(t / n for t, n in zip(seconds[k], tokens[k], strict=True)) for k in runs}
        out = {
            "model": "qwen2-architecture",
            "device": str(ctx.device),
            "dtype": args.dtype,
            "params": params,
            "overrides": overrides,
            "greedy_tokens_identical": greedy["r1mega"] == hf_greedy,
            "greedy_token_agreement": _agreement(greedy["r1mega"], hf_greedy),
            "mean_length_setting": args.mean_length,
            "r1mega_mean_length": statistics.mean(tokens["r1mega"]) / args.batch,
            "hf_mean_length": statistics.mean(tokens["hf"]) / args.batch,
            "r1mega_tok_s": tok_s["r1mega"],
            "hf_tok_s": tok_s["hf"],
            "ratio": tok_s["r1mega"] / tok_s["hf"],
            "r1mega_s": seconds["r1mega"],
            "hf_s": seconds["hf"],
            "cache_bytes_per_token": engines["r1mega"].stats.cache_bytes_per_token,
        }
        if args.floor:
            out.update(_gpu_report(args, model, engines, greedy, tok_s, seconds, prompts))
        return out


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of token positions where two greedy runs agree before their first difference, per row."""
    same = 0
    for x, y in zip(a, b, strict=True):
        same += next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
    return same / max(sum(len(x) for x in a), 1)


def _gpu_report(
    args: argparse.Namespace,
    model: torch.nn.Module,
    engines: dict[str, Any],
    greedy: dict[str, list[list[int]]],
    tok_s: dict[str, float],
    seconds: dict[str, list[float]],
    prompts: list[list[int]],
) -> dict[str, Any]:
    """The CUDA-graph side (when there is one), the memory-bound floor and the fractions reached."""
    device = next(model.parameters()).device
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(device, nbytes=(2 << 30) if device.type == "cuda" else (64 << 20))
    floor_s = decode_floor(weight_bytes, engines["r1mega"].stats.cache_bytes_per_token, [len(p) for p in prompts],
                           args.new_tokens, bw)  # fmt: skip
    floor_tok_s = args.batch * args.new_tokens / floor_s if not args.mean_length else None
    out: dict[str, Any] = {"graphs_on": False, "graphs_captured": 0}
    graphs = engines.get("r1mega_graphs")
    if graphs is not None:
        out = {
            "graphs_on": graphs.cuda_graphs,
            "graphs_captured": graphs.stats.extra.get("graphs_captured", 0),
            "graphs_greedy_equal_eager": greedy["r1mega_graphs"] == greedy["r1mega"],
            "graphs_greedy_agreement": _agreement(greedy["r1mega_graphs"], greedy["r1mega"]),
            "r1mega_graphs_tok_s": tok_s["r1mega_graphs"],
            "r1mega_graphs_s": seconds["r1mega_graphs"],
            "graphs_vs_hf": tok_s["r1mega_graphs"] / tok_s["hf"],
            "graphs_vs_eager": tok_s["r1mega_graphs"] / tok_s["r1mega"],
            "graphs_prefill_s": graphs.stats.prefill_s,
            "graphs_decode_s": graphs.stats.decode_s,
            "floor_fraction_graphs": tok_s["r1mega_graphs"] / floor_tok_s if floor_tok_s else None,
        }
    return {
        **out,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_gb_s": bw / 1e9,
        "floor_tok_s": floor_tok_s,
        "floor_fraction_eager": tok_s["r1mega"] / floor_tok_s if floor_tok_s else None,
        "floor_fraction_hf": tok_s["hf"] / floor_tok_s if floor_tok_s else None,
    }


def moe_mla(args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s and latent-cache size of a DeepSeek-V3-shaped MoE+MLA model at hidden ``--hidden``."""
    from r1mega.config.load import compose_config
    from r1mega.models.builder import build_model
    from r1mega.parallel.bootstrap import single_process
    from r1mega.rollout import RolloutEngine, SamplingParams
    from r1mega.rollout.kv_cache import CacheLayout

    overrides = [o.format(hidden=args.hidden, ffn=args.ffn, vocab=args.vocab) for o in DSV3]
    overrides.append(f"precision={args.dtype}")
    cfg = compose_config(overrides)
    prompts = _prompts(args)
    with single_process(cfg):
        torch.manual_seed(0)
        model = build_model(cfg)[0].eval()
        engine = RolloutEngine([model])
        sampling = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=args.new_tokens, ignore_eos=True)
        engine.generate(prompts[:2] if args.device == "cpu" else prompts, SamplingParams(max_new_tokens=4))
        times = [_time(lambda: engine.generate(prompts, sampling)) for _ in range(args.rounds)]
        layout = CacheLayout.of(model.config)
        elem = next(model.parameters()).element_size()
        return {
            "model": "deepseek-v3-architecture (MLA + MoE)",
            "params": sum(p.numel() for p in model.parameters()),
            "overrides": overrides,
            "tok_s": args.batch * args.new_tokens / statistics.median(times),
            "seconds": times,
            "cache_bytes_per_token": engine.stats.cache_bytes_per_token,
            "cache_bytes_per_token_per_layer": layout.values_per_token * elem,
            "mha_bytes_per_token_per_layer": layout.mha_values_per_token * elem,
            "cache_fraction_of_mha": layout.values_per_token / layout.mha_values_per_token,
        }


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
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "batch": args.batch, "new_tokens": args.new_tokens}
    results["dense"] = d = dense(args)
    lengths = f"mean length {d['r1mega_mean_length']:.1f} (r1mega) / {d['hf_mean_length']:.1f} (HF)"
    print(
        f"dense {d['params'] / 1e6:.1f}M params ({d['dtype']}, {d['device']}), batch {args.batch}, prompts "
        f"{args.prompt_min}-{args.prompt_max} tokens, up to {args.new_tokens} new tokens, T=0.6 top-p 0.95, {lengths}\n"
        f"  r1mega {d['r1mega_tok_s']:.0f} tok/s | HF generate {d['hf_tok_s']:.0f} tok/s | ratio {d['ratio']:.2f}x"
        f" | same greedy tokens: {d['greedy_tokens_identical']} (agreement {d['greedy_token_agreement']:.2f})"
    )
    if "r1mega_graphs_tok_s" in d:
        print(
            f"  r1mega CUDA graphs {d['r1mega_graphs_tok_s']:.0f} tok/s (on: {d['graphs_on']}, "
            f"{d['graphs_captured']} graphs) | vs HF {d['graphs_vs_hf']:.2f}x | vs eager {d['graphs_vs_eager']:.2f}x"
            f" | greedy = eager: {d['graphs_greedy_equal_eager']}"
        )
    if args.floor:
        floor, pct = d["floor_tok_s"], lambda k: "n/a" if d.get(k) is None else f"{100 * d[k]:.1f}%"
        print(
            f"  floor: {d['weight_bytes'] / 1e9:.2f} GB weights + cache at {d['copy_bandwidth_gb_s']:.0f} GB/s copy "
            f"bandwidth -> {'n/a with --mean-length' if floor is None else f'{floor:.0f} tok/s'}; reached: graphs "
            f"{pct('floor_fraction_graphs')}, eager {pct('floor_fraction_eager')}, HF {pct('floor_fraction_hf')}"
        )
    if not args.skip_moe:
        try:
            results["moe_mla"] = m = moe_mla(args)
        except Exception as exc:  # noqa: BLE001 - a GPU run still reports the dense results
            if args.device == "cpu":
                raise
            results["moe_mla"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"MoE+MLA failed: {results['moe_mla']['error']}")
        else:
            print(
                f"MoE+MLA {m['params'] / 1e6:.1f}M params: {m['tok_s']:.0f} tok/s; latent cache "
                f"{m['cache_bytes_per_token_per_layer']} B/token/layer vs {m['mha_bytes_per_token_per_layer']} B "
                f"for MHA ({100 * m['cache_fraction_of_mha']:.1f}%)"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.floor:
        keys = ("device", "dtype", "params", "r1mega_tok_s", "r1mega_graphs_tok_s", "hf_tok_s", "ratio",
                "graphs_vs_hf", "graphs_vs_eager", "graphs_on", "graphs_captured", "graphs_greedy_equal_eager",
                "greedy_token_agreement", "copy_bandwidth_gb_s", "floor_tok_s", "floor_fraction_graphs",
                "floor_fraction_eager", "floor_fraction_hf")  # fmt: skip
        summary = {"batch": args.batch, "new_tokens": args.new_tokens, **{k: d.get(k) for k in keys}}
        summary["moe_mla_tok_s"] = results.get("moe_mla", {}).get("tok_s")
        print("ROLLOUT_GPU " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
