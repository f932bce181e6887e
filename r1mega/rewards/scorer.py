"""Score a batch of completions: every reward named in ``RewardConfig.weights``, and their weighted sum.

Order: sandboxed sample rewards (``accuracy``) go to the verifier pool, all at once so they run
concurrently, each on ``clip_to_answer(sample)``; in-process sample rewards (format, language, overlong)
run here meanwhile; group rewards (Kimi's ``length``) run last, once per GRPO group, reading the sample
rewards. A sandboxed reward that times out, crashes or raises scores 0 and is reported in the breakdown,
except a ``RewardError`` (bad data such as a countdown sample without numbers), which is raised here.
In-process rewards are pure functions of the text and raise on misuse (a missing ``max_tokens``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from r1mega.rewards.answer import clip_to_answer
from r1mega.rewards.pool import JobResult, VerifierPool
from r1mega.rewards.registry import RewardError, RewardInput, RewardSpec, get_reward
from r1mega.utils.logging import get_logger

if TYPE_CHECKING:  # not at run time: verifier workers import this package and must stay free of torch
    from r1mega.config.schema import RewardConfig
    from r1mega.data.prompts import Prompt
    from r1mega.rollout import Completion

log = get_logger(__name__)


@dataclass
class RewardBreakdown:
    """The rewards of one sample."""

    values: dict[str, float]
    """Each configured reward, unweighted (0.0 for one that failed)."""
    total: float
    """``sum(weights[name] * values[name])``: the scalar reward for GRPO."""
    failures: dict[str, str] = field(default_factory=dict)
    """Sandboxed rewards that failed, by name: timeout, crash or error (with what went wrong)."""
    verify_s: float = 0.0
    """Wall time of this sample's jobs in the verifier pool."""

    @property
    def timed_out(self) -> bool:
        """Whether a sandboxed reward hit the time limit."""
        return any(status == "timeout" for status in self.failures.values())


def _apply(job: tuple[Callable[[RewardInput], float], RewardInput]) -> float:
    """Worker side of a scorer job: ``fn(sample)``."""
    fn, sample = job
    return fn(sample)


def _bind(spec: RewardSpec, config: RewardConfig) -> Callable[..., Any]:
    """The reward function with its ``options`` filled in from the config."""
    if not spec.options:
        return spec.fn
    return functools.partial(spec.fn, **{name: getattr(config, name) for name in spec.options})


def _groups(samples: Sequence[RewardInput]) -> list[list[int]]:
    """Indices of each GRPO group in first-seen order (by ``group``, else by identical prompt)."""
    groups: dict[object, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(("id", s.group) if s.group is not None else ("prompt", s.prompt), []).append(i)
    return list(groups.values())


class RewardScorer:
    """Computes ``RewardBreakdown``s with the rewards and weights of a ``RewardConfig``.

    Owns a ``VerifierPool`` built from the config unless one is passed in (then the caller closes it)::

        with RewardScorer(RewardConfig()) as scorer:
            breakdowns = scorer.score_batch(samples)
    """

    def __init__(self, config: RewardConfig, pool: VerifierPool | None = None) -> None:
        self.config = config
        self.specs = {name: get_reward(name) for name in config.weights}
        self._pool = pool
        self._owns_pool = pool is None

    def __enter__(self) -> RewardScorer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def needs_pool(self) -> bool:
        return any(spec.sandboxed for spec in self.specs.values())

    def start(self) -> None:
        """Start the verifier workers now (otherwise the first batch does)."""
        if not self.needs_pool:
            return
        if self._pool is None:
            cfg = self.config
            self._pool = VerifierPool(
                num_workers=cfg.num_workers,
                time_limit_s=cfg.time_limit_s,
                start_method=cfg.start_method,
                memory_limit_mb=cfg.worker_memory_mb,
            )
        self._pool.start()

    def close(self) -> None:
        """Stop the verifier workers this scorer started."""
        if self._owns_pool and self._pool is not None:
            self._pool.close()
            self._pool = None

    def score_completions(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[Completion],
        max_tokens: int,
        prefix_in_prompt: bool,
        groups: Sequence[str],
    ) -> list[RewardBreakdown]:
        """The rewards of ``completions[i]`` sampled for ``prompts[i]`` (in group ``groups[i]``, for rewards
        that compare a group) with the rollout's length limit and whether ``<think>`` was in the prompt."""
        return self.score_batch(
            [
                RewardInput(
                    prompt=p.prompt,
                    completion=c.text,
                    answer=p.answer,
                    task=p.task,
                    completion_tokens=len(c.token_ids),
                    max_tokens=max_tokens,
                    prefix_in_prompt=prefix_in_prompt,
                    group=g,
                )
                for p, c, g in zip(prompts, completions, groups, strict=True)
            ]
        )

    def score_batch(self, samples: Sequence[RewardInput]) -> list[RewardBreakdown]:
        """The rewards of every sample, in order."""
        values: list[dict[str, float]] = [{} for _ in samples]
        failures: list[dict[str, str]] = [{} for _ in samples]
        verify_s = [0.0] * len(samples)
        self._run_sandboxed(samples, values, failures, verify_s)
        for name, spec in self.specs.items():
            if not spec.sandboxed and not spec.group:
                fn = _bind(spec, self.config)
                for i, sample in enumerate(samples):
                    values[i][name] = float(fn(sample))
        for name, spec in self.specs.items():
            if spec.group:
                self._run_group(name, spec, samples, values)
        weights = self.config.weights
        return [
            RewardBreakdown(
                values={name: v[name] for name in self.specs},
                total=sum(weights[name] * v[name] for name in self.specs),
                failures=f,
                verify_s=t,
            )
            for v, f, t in zip(values, failures, verify_s, strict=True)
        ]

    def _run_sandboxed(
        self,
        samples: Sequence[RewardInput],
        values: list[dict[str, float]],
        failures: list[dict[str, str]],
        verify_s: list[float],
    ) -> None:
        names = [name for name, spec in self.specs.items() if spec.sandboxed]
        if not names or not samples:
            return
        if self._pool is None:
            self.start()
        clipped = [clip_to_answer(s, self.config.max_answer_chars) for s in samples]
        fns = {name: _bind(self.specs[name], self.config) for name in names}
        jobs = [(name, i) for name in names for i in range(len(samples))]
        results: list[JobResult] = self._pool.map(_apply, [(fns[name], clipped[i]) for name, i in jobs])
        counts: dict[str, int] = {}
        for (name, i), result in zip(jobs, results, strict=True):
            values[i][name] = result.value
            verify_s[i] += result.elapsed_s
            if not result.ok:
                if result.error is not None and result.error.startswith("RewardError"):
                    raise RewardError(f"Reward {name!r} failed on sample {i}: {result.error}")
                failures[i][name] = result.status if result.error is None else f"{result.status}: {result.error}"
                counts[result.status] = counts.get(result.status, 0) + 1
        if counts:
            summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
            log.info("Verification of %d jobs: %s (scored 0)", len(jobs), summary)

    def _run_group(
        self, name: str, spec: RewardSpec, samples: Sequence[RewardInput], values: list[dict[str, float]]
    ) -> None:
        fn = _bind(spec, self.config)
        for group in _groups(samples):
            out = fn([samples[i] for i in group], [values[i] for i in group])
            if len(out) != len(group):
                raise RewardError(f"Group reward {name!r} returned {len(out)} values for a group of {len(group)}.")
            for i, v in zip(group, out, strict=True):
                values[i][name] = float(v)


def batch_metrics(breakdowns: Sequence[RewardBreakdown]) -> dict[str, float]:
    """Means for logging: ``reward/total``, ``reward/<name>``, ``reward/timeout_rate``, ``reward/failure_rate``
    and ``reward/verify_s_max``."""
    if not breakdowns:
        return {}
    n = len(breakdowns)
    metrics = {"reward/total": sum(b.total for b in breakdowns) / n}
    for name in breakdowns[0].values:
        metrics[f"reward/{name}"] = sum(b.values[name] for b in breakdowns) / n
    metrics["reward/timeout_rate"] = sum(b.timed_out for b in breakdowns) / n
    metrics["reward/failure_rate"] = sum(bool(b.failures) for b in breakdowns) / n
    metrics["reward/verify_s_max"] = max(b.verify_s for b in breakdowns)
    return metrics
