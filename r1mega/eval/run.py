"""``r1mega-eval``'s job: DeepSeek-R1's evaluation protocol on a checkpoint, written as JSON and Markdown.

For each prompt of ``data.eval_path`` (the first ``eval.max_prompts``) ``eval.samples`` responses are sampled
at ``eval.temperature`` / ``eval.top_p`` after the forced prefix ``grpo.prefix``, scored by the accuracy and
format rewards and summarised by ``r1mega.eval.protocol.summarize``: pass@1 averaged over the k samples,
cons@k (majority vote), format rate, mean response length in tokens, overall and per task.

Written to ``eval.output_dir``: ``eval.json`` (metrics, per-task metrics, settings, provenance), ``eval.md``
(the same as Markdown tables) and ``samples.jsonl`` (every sample with its extracted answer and verdict).
Data-parallel ranks evaluate their own share of the prompts; rank 0 gathers and writes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from r1mega.config.errors import ConfigError
from r1mega.config.schema import R1Config
from r1mega.data.prompts import Prompt, load_prompts
from r1mega.eval.protocol import SampleResult, evaluate_prompts, summarize
from r1mega.parallel.bootstrap import ParallelContext
from r1mega.rewards import RewardScorer
from r1mega.rollout import SamplingParams
from r1mega.rollout.generation import GenerationJob
from r1mega.utils.logging import get_logger

log = get_logger(__name__)

EVAL_REWARDS = {"accuracy": 1.0, "format": 1.0}
"""The rewards the protocol reads (correctness and format)."""
_COLUMNS = (
    ("pass@1", "pass@1"),
    ("cons@k", "cons@{k}"),
    ("format_rate", "format rate"),
    ("response_length", "mean length"),
)


def build_report(results: Sequence[SampleResult], k: int) -> dict[str, Any]:
    """Metrics overall (``summarize``'s keys, ``accuracy/<task>`` included) and per task."""
    tasks = sorted({r.task or "unknown" for r in results})
    per_task = {}
    for task in tasks:
        metrics = summarize([r for r in results if (r.task or "unknown") == task])
        per_task[task] = {key: v for key, v in metrics.items() if not key.startswith("accuracy/")}
    return {"k": k, "metrics": summarize(results), "tasks": per_task}


def markdown_report(report: dict[str, Any]) -> str:
    """``eval.md``: the settings, then one table row for all prompts and one per task."""
    k, s = report["k"], report["settings"]
    header = ["task", "prompts", *(name.format(k=k) for _, name in _COLUMNS)]
    rows = [("**all**", report["metrics"]), *report["tasks"].items()]
    lines = [
        f"# Evaluation of `{report['model']}`",
        "",
        f"Checkpoint `{report['checkpoint']}`, prompts `{report['eval_path']}`: k={k} samples per prompt at "
        f"T={s['temperature']}, top-p={s['top_p']}, at most {s['max_new_tokens']} new tokens.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for task, m in rows:
        cells = [task, str(int(m["prompts"]))]
        cells += [f"{m[key]:.1f}" if key == "response_length" else f"{m[key]:.3f}" for key, _ in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _evaluate_share(cfg: R1Config, job: GenerationJob, prompts: list[Prompt]) -> list[tuple[int, list[SampleResult]]]:
    """(prompt index, its k results) for this rank's share of ``prompts``."""
    e = cfg.eval
    params = SamplingParams(temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens)
    out: list[tuple[int, list[SampleResult]]] = []
    with RewardScorer(dataclasses.replace(cfg.reward, weights=dict(EVAL_REWARDS))) as scorer:
        for batch in job.batches(job.shard(prompts), e.batch_size, "evaluating"):
            results = evaluate_prompts(
                job.engine, scorer, [p for _, p in batch], e.samples, params, job.prefix, job.system_prompt
            )
            out += [(i, results[n * e.samples : (n + 1) * e.samples]) for n, (i, _) in enumerate(batch)]
    return out


def _write(cfg: R1Config, report: dict[str, Any], results: list[SampleResult]) -> Path:
    out = Path(cfg.eval.output_dir or Path(cfg.run_dir) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "eval.md").write_text(markdown_report(report))
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(dataclasses.asdict(r), ensure_ascii=False) + "\n")
    return out


def run_evaluation(cfg: R1Config, ctx: ParallelContext) -> dict[str, Any]:
    """Evaluate ``checkpoint.load`` on ``eval.prompts_path`` (else ``data.eval_path``) and write the report
    (collective); returns the report (see ``build_report``, plus settings and provenance) on every rank."""
    path = cfg.eval.prompts_path or cfg.data.eval_path
    if not path:
        raise ConfigError("data.eval_path", None, "a prompt JSONL to evaluate on (r1mega.data.prompts formats)")
    prompts = load_prompts(path)
    if cfg.eval.max_prompts:
        prompts = prompts[: cfg.eval.max_prompts]
    job = GenerationJob(cfg, ctx)
    start = time.perf_counter()
    gathered = job.gather(_evaluate_share(cfg, job, prompts))
    report = None
    if gathered is not None:
        pairs = sorted((pair for part in gathered for pair in part), key=lambda pair: pair[0])
        results = [r for _, rs in pairs for r in rs]
        report = build_report(results, cfg.eval.samples)
        report.update(
            checkpoint=str(job.checkpoint),
            model=cfg.model.name,
            eval_path=path,
            prefix=job.prefix,
            system_prompt=job.system_prompt,
            settings=dataclasses.asdict(cfg.eval),
            generated_tokens=sum(r.length for r in results),
            elapsed_s=time.perf_counter() - start,
        )
        out = _write(cfg, report, results)
        m = report["metrics"]
        log.info(
            "pass@1=%.4f cons@%d=%.4f format_rate=%.3f response_length=%.1f over %d prompts; wrote %s",
            m["pass@1"], cfg.eval.samples, m["cons@k"], m["format_rate"], m["response_length"], int(m["prompts"]), out,
        )  # fmt: skip
    return job.broadcast(report)
