"""Two measurements of ``rollout_throughput.py`` on the tiny MoE+MLA policy after cold-start SFT (the run whose
MTP module was trained): MTP speculative decoding (acceptance rate, tokens/s against plain decoding) and the
bf16 log-probability gap between the rollout engine and the trainer's forward, with the truncated importance
weights GRPO's ``grpo.loss.rollout_correction=tis`` would apply.

The checkpoint and the cold-start data come from ``r1mega-pipeline`` (its ``data``, ``base`` and
``cold_start_sft`` steps): ``--mtp-checkpoint runs/pipeline/cold_start_sft --mtp-data data/cold_start_easy``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _policy(checkpoint: str, data: str, dtype: str) -> tuple[list[torch.nn.Module], Any, list[list[int]]]:
    """The SFT policy's chunks, its tokenizer and the held-out prompts rendered with R1's ``<think>`` prefix."""
    from r1mega.checkpoint.weights import load_weights
    from r1mega.config.load import compose_config
    from r1mega.data.prompts import load_prompts, render_prompt
    from r1mega.data.tokenizer import load_model_tokenizer
    from r1mega.models.builder import build_model
    from r1mega.rollout.generation import resolve_checkpoint

    cfg = compose_config(["model=dsv3_tiny", f"precision={dtype}"])
    chunks = build_model(cfg)
    load_weights(chunks, str(resolve_checkpoint(checkpoint)))
    tok = load_model_tokenizer(str(Path(data) / "tokenizer"), cfg.model.vocab_size)
    prompts = load_prompts(str(Path(data) / "eval_prompts.jsonl"))
    return chunks, tok, [render_prompt(tok, p.prompt, "<think>\n") for p in prompts]


def speculative(
    checkpoint: str, data: str, batches: list[int], rounds: int, new_tokens: int, clock: Any = time.perf_counter
) -> list[dict[str, Any]]:
    """Plain vs MTP-speculative decoding (the per-row loop, ``max_batch`` rows) on the SFT policy: R1's sampling
    (T=0.6, top-p 0.95) and greedy, ``2 * batch`` held-out prompts per call."""
    from r1mega.config.load import compose_config
    from r1mega.parallel.bootstrap import single_process
    from r1mega.rollout import RolloutEngine, SamplingParams

    rows = []
    with single_process(compose_config(["model=dsv3_tiny"])):
        chunks, tok, prompts = _policy(checkpoint, data, "fp32")
        for batch in batches:
            work = (prompts * (2 * batch // len(prompts) + 1))[: 2 * batch]
            seeds = list(range(len(work)))
            for name, params in (
                ("T=0.6 top-p 0.95", SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=new_tokens)),
                ("greedy", SamplingParams(temperature=0, max_new_tokens=new_tokens)),
            ):
                engines = {s: RolloutEngine(chunks, tok, vocab_size=len(tok), max_batch=batch, speculative=s)
                           for s in (False, True)}  # fmt: skip
                speed: dict[bool, list[float]] = {False: [], True: []}
                outs: dict[bool, list[list[int]]] = {}
                for _ in range(rounds):
                    for s, engine in engines.items():
                        t0 = clock()
                        done = engine.generate(work, params, seeds=seeds)
                        speed[s].append(sum(len(c.token_ids) for c in done) / (clock() - t0))
                        outs[s] = [c.token_ids for c in done]
                plain, spec = statistics.median(speed[False]), statistics.median(speed[True])
                rows.append({
                    "batch": batch, "sampling": name, "plain_tok_s": plain, "spec_tok_s": spec, "speedup": spec / plain,
                    "acceptance_rate": engines[True].stats.extra["acceptance_rate"],
                    "identical": sum(a == b for a, b in zip(outs[False], outs[True], strict=True)), "rows": len(work),
                })  # fmt: skip
    return rows


def logprob_gap(checkpoint: str | None, data: str | None, new_tokens: int) -> list[dict[str, Any]]:
    """bf16 rollout log-probabilities against the bf16 training forward on the same tokens (T=1, no truncation:
    GRPO's default sampling), and the truncated importance weights (cap 2) TIS would apply. On the SFT policy
    when given, and on a randomly initialised dense Qwen2-architecture model."""
    from r1mega.config.load import compose_config
    from r1mega.models.builder import build_model
    from r1mega.models.forward import forward_logits
    from r1mega.parallel.bootstrap import single_process
    from r1mega.rl.rollout_correction import get_rollout_correction
    from r1mega.rollout import RolloutEngine, SamplingParams

    gen = torch.Generator().manual_seed(0)
    random_prompts = [torch.randint(10, 2000, (int(n),), generator=gen).tolist() for n in torch.randint(8, 32, (16,))]
    cases: list[tuple[str, str]] = [("qwen2_tiny (random init)", "qwen2_tiny")]
    if checkpoint and data:
        cases.insert(0, ("dsv3_tiny after cold-start SFT", "dsv3_tiny"))
    rows = []
    for label, model in cases:
        with single_process(compose_config([f"model={model}", "precision=bf16"])):
            if "SFT" in label:
                chunks, tok, prompts = _policy(checkpoint, data, "bf16")
                prompts, vocab = prompts[:16], len(tok)
            else:
                torch.manual_seed(0)
                chunks, prompts, vocab = (
                    build_model(compose_config([f"model={model}", "precision=bf16"])),
                    random_prompts,
                    None,
                )
            params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=new_tokens, seed=1)
            outs = RolloutEngine(chunks, vocab_size=vocab).generate(prompts, params)
            width = max(len(o.token_ids) for o in outs)
            engine_lp, train_lp = torch.zeros(len(outs), width), torch.zeros(len(outs), width)
            mask = torch.zeros(len(outs), width, dtype=torch.bool)
            for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
                with torch.no_grad():
                    logits = forward_logits(chunks[0].eval(), torch.tensor([p + o.token_ids]))[0].float()  # (s, V)
                if vocab is not None:
                    logits[:, vocab:] = float("-inf")
                lp = torch.log_softmax(logits, dim=-1)[len(p) - 1 : -1].gather(-1, torch.tensor(o.token_ids)[:, None])
                n = len(o.token_ids)
                engine_lp[i, :n], train_lp[i, :n], mask[i, :n] = torch.tensor(o.logprobs), lp[:, 0], True
            tis = get_rollout_correction("tis")(train_lp, engine_lp, mask, 2.0).metrics
            rows.append({"model": label, "tokens": int(mask.sum()), **{k: float(v) for k, v in tis.items()}})
    return rows
