"""Rejection sampling: sample a checkpoint on a prompt set, keep the good responses, write an SFT set.

DeepSeek-R1 builds its second SFT round this way: from the reasoning-RL checkpoint, several responses per
prompt, of which only the correct ones in a clean, single-language format are kept. Here, per prompt,
``rejection.samples_per_prompt`` responses are sampled (after the forced prefix ``grpo.prefix``) and
scored with the registered rewards, then filtered in this order, each rejected response counted under the
first filter it fails:

``truncated``       cut by ``max_new_tokens`` (with ``require_format``)
``special_tokens``  chat-template tokens (BOS, EOS, role tags) inside the text: they would forge turns in SFT
``format``          not one ``<think>...</think>`` block then a non-empty answer (with ``require_format``)
``incorrect``       the verifier rejects the final answer (with ``require_correct``)
``language``        reasoning below ``min_language_share`` in the prompt's script
``too_short`` / ``too_long``  outside ``min_response_tokens`` / ``max_response_tokens``
``duplicate``       the same reasoning text as a kept response to the same prompt (with ``dedupe``)
``surplus``         beyond ``max_per_prompt`` (best total reward kept, then the shorter, then the first)

Output, in ``rejection.output_dir``: ``train.jsonl`` in the SFT format of ``r1mega.data.sft`` (the cold-start
set's: ``{id, prompt, reasoning, response, meta: {task, answer, provenance}}``, reasoning being the text
inside the think block and response the text after it; provenance names the checkpoint, prompt id, sample
index, rewards and sampling settings), ready for ``r1mega-train stage=sft data.train_path=.../train.jsonl``,
and ``summary.json`` (kept fraction overall and per task, rejections per filter, throughput).

Distillation composes from two steps, because the traces are text (the student re-tokenizes them with its
own tokenizer):

1. teacher traces: this job with the teacher's model and weights, usually one best trace per prompt::

       r1mega-rejection-sample model=deepseek_v3 checkpoint.load=TEACHER rejection=distill \\
           data.tokenizer=TEACHER_TOKENIZER rejection.prompts_path=prompts.jsonl rejection.output_dir=traces

2. the student (Qwen2 / Llama) fine-tuned on them::

       r1mega-train stage=sft model=qwen2_5_7b checkpoint.load=STUDENT data=cold_start \\
           data.train_path=traces/train.jsonl data.tokenizer=STUDENT_TOKENIZER

Data-parallel ranks sample their own share of the prompts; rank 0 gathers, writes and returns the summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1mega.config.errors import ConfigError
from r1mega.config.schema import R1Config, RejectionConfig
from r1mega.data.prompts import Prompt, load_prompts, render_prompt
from r1mega.parallel.bootstrap import ParallelContext
from r1mega.rewards import RewardBreakdown, RewardScorer
from r1mega.rewards.answer import THINK_END, answer_region, reasoning_text
from r1mega.rewards.formatting import think_format_ok
from r1mega.rollout import Completion, SamplingParams
from r1mega.rollout.generation import GenerationJob
from r1mega.utils.logging import get_logger

log = get_logger(__name__)

REJECT_REASONS = (
    "truncated",
    "special_tokens",
    "format",
    "incorrect",
    "language",
    "too_short",
    "too_long",
    "duplicate",
    "surplus",
)
"""The filters in the order they apply (see the module docstring)."""

FILTER_REWARDS = ("accuracy", "format", "language")
"""Rewards the filters read; computed even when ``reward.weights`` leaves them out (then with weight 0)."""


@dataclass
class Candidate:
    """One sampled response to a prompt and its rewards."""

    index: int
    """Sample index among the prompt's ``samples_per_prompt`` responses."""
    completion: Completion
    rewards: RewardBreakdown


@dataclass
class PromptOutcome:
    """What one prompt gave: its kept records and why the rest were dropped."""

    index: int
    """Position of the prompt in the prompt file."""
    task: str
    samples: int
    correct: int
    """Responses whose answer the verifier accepted (kept or not)."""
    generated_tokens: int
    records: list[dict[str, Any]] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)


def split_completion(text: str, prefix_in_prompt: bool = True) -> tuple[str, str]:
    """(reasoning, response) of a completion: the text inside the think block and the text after it,
    stripped; the response is empty when the think block is never closed."""
    region = answer_region(text, prefix_in_prompt) if THINK_END in text else None
    return reasoning_text(text, prefix_in_prompt).strip(), (region or "").strip()


def sample_rejection(
    c: Candidate, cfg: RejectionConfig, prefix_in_prompt: bool = True, forbidden: Sequence[str] = ()
) -> str | None:
    """The first per-sample filter ``c`` fails (``truncated`` ... ``too_long``), or None when it passes them."""
    text, values, n = c.completion.text, c.rewards.values, len(c.completion.token_ids)
    if cfg.require_format and c.completion.finish_reason == "length":
        return "truncated"
    if any(token in text for token in forbidden):
        return "special_tokens"
    if cfg.require_format and not think_format_ok(text, prefix_in_prompt):
        return "format"
    if cfg.require_correct and values["accuracy"] <= 0.5:
        return "incorrect"
    if cfg.min_language_share > 0 and values["language"] < cfg.min_language_share:
        return "language"
    if n < cfg.min_response_tokens:
        return "too_short"
    if cfg.max_response_tokens is not None and n > cfg.max_response_tokens:
        return "too_long"
    return None


def filter_candidates(
    candidates: Sequence[Candidate], cfg: RejectionConfig, prefix_in_prompt: bool = True, forbidden: Sequence[str] = ()
) -> tuple[list[Candidate], Counter[str]]:
    """The responses to one prompt that pass every filter (in sample order), and the rejections by filter."""
    rejected: Counter[str] = Counter()
    passed, seen = [], set()
    for c in sorted(candidates, key=lambda c: c.index):
        reason = sample_rejection(c, cfg, prefix_in_prompt, forbidden)
        if reason is None and cfg.dedupe:
            reasoning = split_completion(c.completion.text, prefix_in_prompt)[0]
            reason = "duplicate" if reasoning in seen else None
            seen.add(reasoning)
        if reason is None:
            passed.append(c)
        else:
            rejected[reason] += 1
    if cfg.max_per_prompt and len(passed) > cfg.max_per_prompt:
        ranked = sorted(passed, key=lambda c: (-c.rewards.total, len(c.completion.token_ids), c.index))
        best = {c.index for c in ranked[: cfg.max_per_prompt]}
        rejected["surplus"] += len(passed) - len(best)
        passed = [c for c in passed if c.index in best]
    return passed, rejected


def sft_record(prompt: Prompt, c: Candidate, provenance: dict[str, Any], prefix_in_prompt: bool = True) -> dict:
    """The SFT JSONL record of a kept response (``r1mega.data.sft``'s prompt/reasoning/response form)."""
    reasoning, response = split_completion(c.completion.text, prefix_in_prompt)
    return {
        "id": f"{prompt.id}-rs{c.index}",
        "prompt": prompt.prompt,
        "reasoning": reasoning,
        "response": response,
        "meta": {
            "task": prompt.task,
            "answer": prompt.answer,
            "provenance": {
                **provenance,
                "prompt_id": prompt.id,
                "sample_index": c.index,
                "rewards": c.rewards.values,
                "reward_total": c.rewards.total,
                "response_tokens": len(c.completion.token_ids),
                "finish_reason": c.completion.finish_reason,
            },
        },
    }


def summarize_outcomes(outcomes: Sequence[PromptOutcome]) -> dict[str, Any]:
    """Counts and kept fractions overall and per task, and rejections per filter."""

    def totals(group: Sequence[PromptOutcome]) -> dict[str, Any]:
        samples = sum(o.samples for o in group)
        kept = sum(len(o.records) for o in group)
        return {
            "prompts": len(group),
            "samples": samples,
            "kept": kept,
            "kept_fraction": kept / max(samples, 1),
            "prompts_with_kept": sum(bool(o.records) for o in group),
            "accuracy": sum(o.correct for o in group) / max(samples, 1),
        }

    rejected: Counter[str] = Counter()
    for o in outcomes:
        rejected.update(o.rejected)
    tasks = sorted({o.task for o in outcomes})
    return {
        **totals(outcomes),
        "rejected": {reason: rejected[reason] for reason in REJECT_REASONS},
        "tasks": {t: totals([o for o in outcomes if o.task == t]) for t in tasks},
    }


class _Sampler:
    """Samples, scores and filters batches of prompts on this rank."""

    def __init__(self, cfg: R1Config, job: GenerationJob) -> None:
        r = cfg.rejection
        self.r, self.job = r, job
        weights = {name: 0.0 for name in FILTER_REWARDS} | dict(cfg.reward.weights)
        self.scorer = RewardScorer(dataclasses.replace(cfg.reward, weights=weights))
        self.params = SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)
        self.prefixed = bool(job.prefix)
        self.provenance = {
            "checkpoint": str(job.checkpoint),
            "model": cfg.model.name,
            "temperature": r.temperature,
            "top_p": r.top_p,
        }

    def run(self, batch: list[tuple[int, Prompt]]) -> list[PromptOutcome]:
        k = self.r.samples_per_prompt
        ids = [render_prompt(self.job.tokenizer, p.prompt, self.job.prefix, self.job.system_prompt) for _, p in batch]
        completions = self.job.engine.generate([x for x in ids for _ in range(k)], self.params)
        if not self.job.reports:
            return []
        flat = [(i, p) for i, p in batch for _ in range(k)]
        scores = self.scorer.score_completions(
            [p for _, p in flat], completions, self.r.max_new_tokens, self.prefixed, [str(i) for i, _ in flat]
        )
        return [
            self._outcome(i, p, completions[n * k : (n + 1) * k], scores[n * k : (n + 1) * k])
            for n, (i, p) in enumerate(batch)
        ]

    def _outcome(
        self, index: int, prompt: Prompt, completions: list[Completion], scores: list[RewardBreakdown]
    ) -> PromptOutcome:
        candidates = [Candidate(j, c, s) for j, (c, s) in enumerate(zip(completions, scores, strict=True))]
        kept, rejected = filter_candidates(candidates, self.r, self.prefixed, self.job.forbidden)
        return PromptOutcome(
            index=index,
            task=prompt.task or "unknown",
            samples=len(candidates),
            correct=sum(s.values["accuracy"] > 0.5 for s in scores),
            generated_tokens=sum(len(c.token_ids) for c in completions),
            records=[sft_record(prompt, c, self.provenance, self.prefixed) for c in kept],
            rejected=dict(rejected),
        )


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write(cfg: R1Config, outcomes: list[PromptOutcome], prompts_path: str, elapsed: float, ckpt: str) -> dict:
    out = Path(cfg.rejection.output_dir or Path(cfg.run_dir) / "rejection_sampling")
    out.mkdir(parents=True, exist_ok=True)
    outcomes = sorted(outcomes, key=lambda o: o.index)
    lines = [json.dumps(rec, ensure_ascii=False) + "\n" for o in outcomes for rec in o.records]
    _write_atomically(out / "train.jsonl", "".join(lines))
    tokens = sum(o.generated_tokens for o in outcomes)
    summary = {
        **summarize_outcomes(outcomes),
        "output": str(out / "train.jsonl"),
        "checkpoint": ckpt,
        "model": cfg.model.name,
        "prompts_path": prompts_path,
        "generated_tokens": tokens,
        "elapsed_s": elapsed,
        "tokens_per_s": tokens / max(elapsed, 1e-9),
        "config": dataclasses.asdict(cfg.rejection),
    }
    _write_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if not summary["kept"]:
        log.warning(
            "no response passed the filters: %s is empty (summary.json counts the rejections)", summary["output"]
        )
    log.info(
        "kept %d of %d responses (%.1f%%) for %d of %d prompts; rejected %s; wrote %s",
        summary["kept"],
        summary["samples"],
        100 * summary["kept_fraction"],
        summary["prompts_with_kept"],
        summary["prompts"],
        {k: v for k, v in summary["rejected"].items() if v} or "none",
        summary["output"],
    )
    return summary


def run_rejection_sampling(cfg: R1Config, ctx: ParallelContext) -> dict[str, Any]:
    """Sample, score, filter and write the SFT set and summary (collective); returns the summary on every rank."""
    r = cfg.rejection
    prompts_path = r.prompts_path or cfg.data.train_path
    if not prompts_path:
        raise ConfigError("rejection.prompts_path", None, "a prompt JSONL (or data.train_path) to sample for")
    prompts = load_prompts(prompts_path)
    if r.max_prompts:
        prompts = prompts[: r.max_prompts]
    job = GenerationJob(cfg, ctx)
    sampler = _Sampler(cfg, job)
    start = time.perf_counter()
    outcomes: list[PromptOutcome] = []
    try:
        for batch in job.batches(job.shard(prompts), r.batch_size, "rejection sampling"):
            outcomes.extend(sampler.run(batch))
    finally:
        sampler.scorer.close()
    gathered = job.gather(outcomes)
    summary = None
    if gathered is not None:
        flat = [o for part in gathered for o in part]
        summary = _write(cfg, flat, prompts_path, time.perf_counter() - start, str(job.checkpoint))
    return job.broadcast(summary)
