"""DeepSeek-R1's evaluation protocol: k samples per prompt at T=0.6 / top-p 0.95, pass@1 averaged over
the k samples, cons@k by majority vote, per-task accuracy, format rate and mean response length.

``pass@1 = mean_prompts( mean_k( correct ) )``; ``cons@k`` marks a prompt correct when the most frequent
extracted answer among its k samples (ties: the first seen) belongs to a correct sample. Used by the GRPO
stage's periodic evaluation and by ``r1mega-eval``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from r1mega.data.prompts import Prompt, render_prompt
from r1mega.rewards import extract_answer
from r1mega.rewards.scorer import RewardScorer
from r1mega.rollout import RolloutEngine, SamplingParams


@dataclass
class SampleResult:
    """One scored sample of the evaluation."""

    prompt_id: str
    task: str | None
    text: str
    answer: str | None
    correct: bool
    formatted: bool
    length: int


def summarize(results: Sequence[SampleResult]) -> dict[str, float]:
    """pass@1 (mean over prompts of the mean over samples), cons@k, format rate, length, per-task accuracy."""
    by_prompt: dict[str, list[SampleResult]] = defaultdict(list)
    for r in results:
        by_prompt[r.prompt_id].append(r)
    if not by_prompt:
        return {}
    pass1, cons, tasks = [], [], defaultdict(list)
    for samples in by_prompt.values():
        acc = sum(s.correct for s in samples) / len(samples)
        pass1.append(acc)
        tasks[samples[0].task or "unknown"].append(acc)
        votes = Counter(s.answer for s in samples if s.answer is not None)
        if votes:
            top = max(votes.values())
            winner = next(s.answer for s in samples if s.answer is not None and votes[s.answer] == top)
            cons.append(any(s.correct for s in samples if s.answer == winner))
        else:
            cons.append(False)
    n = len(results)
    metrics = {
        "pass@1": sum(pass1) / len(pass1),
        "cons@k": sum(cons) / len(cons),
        "format_rate": sum(r.formatted for r in results) / n,
        "response_length": sum(r.length for r in results) / n,
        "prompts": float(len(by_prompt)),
    }
    metrics.update({f"accuracy/{task}": sum(v) / len(v) for task, v in sorted(tasks.items())})
    return metrics


def evaluate_prompts(
    engine: RolloutEngine,
    scorer: RewardScorer,
    prompts: Sequence[Prompt],
    samples: int,
    params: SamplingParams,
    prefix: str = "<think>\n",
    system: str | None = None,
) -> list[SampleResult]:
    """Sample ``samples`` completions per prompt and score them (accuracy and format rewards); each prompt is
    rendered after the system turn ``system`` and followed by ``prefix``."""
    ids = [render_prompt(engine.tokenizer, p.prompt, prefix, system) for p in prompts for _ in range(samples)]
    completions = engine.generate(ids, params)
    flat = [p for p in prompts for _ in range(samples)]
    scores = scorer.score_completions(flat, completions, params.max_new_tokens, bool(prefix), [p.id for p in flat])
    return [
        SampleResult(
            prompt_id=p.id,
            task=p.task,
            text=c.text,
            answer=extract_answer(c.text, prefix_in_prompt=bool(prefix)),
            correct=s.values.get("accuracy", 0.0) > 0.5,
            formatted=s.values.get("format", 0.0) > 0.5,
            length=len(c.token_ids),
        )
        for p, c, s in zip(flat, completions, scores, strict=True)
    ]
