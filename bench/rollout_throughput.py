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

Example::

    python bench/rollout_throughput.py                 # hidden 512, 8 layers, batch 16, 128 new tokens
    python bench/rollout_throughput.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
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
    "model.num_attention_heads=8",
    "model.num_query_groups=2",
    "model.vocab_size={vocab}",
]
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
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
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
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def _prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 49, (batch,), generator=g).tolist()
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths]


def _stop_ids(args: argparse.Namespace) -> tuple[int, ...]:
    """Token ids that end a response: an untrained model samples nearly uniformly, so k of V ids end a
    response with probability ~k/V per token (a geometric length with mean ~V/k, cut at --new-tokens)."""
    if not args.mean_length:
        return ()
    k = max(args.vocab // args.mean_length, 1)
    return tuple(range(10, 10 + k))


def _hf_model(cfg: Any, model: torch.nn.Module) -> torch.nn.Module:
    """``transformers.Qwen2ForCausalLM`` holding ``model``'s weights (through r1mega's adapter)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1mega.convert.convert import make_adapter

    adapter = make_adapter(cfg.model)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf = Qwen2ForCausalLM(Qwen2Config(**adapter.hf_config(), attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(adapter.to_hf_state_dict(state), strict=False)
    missing = [k for k in missing if not (hf.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight copy failed: missing {missing}, unexpected {unexpected}")
    return hf.eval()


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
            input_ids=ids,
            attention_mask=mask,
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


def _time(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def dense(args: argparse.Namespace) -> dict[str, Any]:
    """r1mega engine vs HF generate on the same dense Qwen2-architecture weights."""
    from r1mega.config.load import compose_config
    from r1mega.models.builder import build_model
    from r1mega.parallel.bootstrap import single_process
    from r1mega.rollout import RolloutEngine, SamplingParams

    overrides = [o.format(hidden=args.hidden, layers=args.layers, ffn=args.ffn, vocab=args.vocab) for o in QWEN]
    cfg = compose_config(overrides)
    prompts = _prompts(args.batch, args.vocab)
    with single_process(cfg):
        torch.manual_seed(0)
        model = build_model(cfg)[0].eval()
        params = sum(p.numel() for p in model.parameters())
        hf = _hf_model(cfg, model)
        engine = RolloutEngine([model])
        greedy = engine.generate(prompts[:4], SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))
        same = [g.token_ids for g in greedy] == _hf_generate(hf, prompts[:4], 16, sample=False)
        stop = _stop_ids(args)
        sampling = SamplingParams(
            temperature=0.6, top_p=0.95, max_new_tokens=args.new_tokens, ignore_eos=True, stop_token_ids=stop
        )
        ours, theirs, our_tokens, their_tokens = [], [], [], []
        for _ in range(args.rounds):
            ours.append(
                _time(lambda: our_tokens.append(sum(len(c.token_ids) for c in engine.generate(prompts, sampling))))
            )
            theirs.append(
                _time(
                    lambda: their_tokens.append(
                        sum(_length(row, stop) for row in _hf_generate(hf, prompts, args.new_tokens, True, stop))
                    )
                )
            )
        r = statistics.median(t / n for t, n in zip(ours, our_tokens, strict=True))  # seconds per useful token
        h = statistics.median(t / n for t, n in zip(theirs, their_tokens, strict=True))
        return {
            "model": "qwen2-architecture",
            "params": params,
            "overrides": overrides,
            "greedy_tokens_identical": same,
            "mean_length_setting": args.mean_length,
            "r1mega_mean_length": statistics.mean(our_tokens) / args.batch,
            "hf_mean_length": statistics.mean(their_tokens) / args.batch,
            "r1mega_tok_s": 1 / r,
            "hf_tok_s": 1 / h,
            "ratio": h / r,
            "r1mega_s": ours,
            "hf_s": theirs,
            "cache_bytes_per_token": engine.stats.cache_bytes_per_token,
        }


def moe_mla(args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s and latent-cache size of a DeepSeek-V3-shaped MoE+MLA model at hidden ``--hidden``."""
    from r1mega.config.load import compose_config
    from r1mega.models.builder import build_model
    from r1mega.parallel.bootstrap import single_process
    from r1mega.rollout import RolloutEngine, SamplingParams
    from r1mega.rollout.kv_cache import CacheLayout

    overrides = [o.format(hidden=args.hidden, ffn=args.ffn, vocab=args.vocab) for o in DSV3]
    cfg = compose_config(overrides)
    prompts = _prompts(args.batch, args.vocab)
    with single_process(cfg):
        torch.manual_seed(0)
        model = build_model(cfg)[0].eval()
        engine = RolloutEngine([model])
        sampling = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=args.new_tokens, ignore_eos=True)
        engine.generate(prompts[:2], SamplingParams(max_new_tokens=4))
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
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "batch": args.batch, "new_tokens": args.new_tokens}
    results["dense"] = d = dense(args)
    lengths = f"mean length {d['r1mega_mean_length']:.1f} (r1mega) / {d['hf_mean_length']:.1f} (HF)"
    print(
        f"dense {d['params'] / 1e6:.1f}M params, batch {args.batch}, up to {args.new_tokens} new tokens, "
        f"T=0.6 top-p 0.95, {lengths}\n"
        f"  r1mega {d['r1mega_tok_s']:.0f} tok/s | HF generate {d['hf_tok_s']:.0f} tok/s | ratio {d['ratio']:.2f}x"
        f" | same greedy tokens: {d['greedy_tokens_identical']}"
    )
    if not args.skip_moe:
        results["moe_mla"] = m = moe_mla(args)
        print(
            f"MoE+MLA {m['params'] / 1e6:.1f}M params: {m['tok_s']:.0f} tok/s; latent cache "
            f"{m['cache_bytes_per_token_per_layer']} B/token/layer vs {m['mha_bytes_per_token_per_layer']} B for MHA "
            f"({100 * m['cache_fraction_of_mha']:.1f}%)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
