"""What a reward sees (``RewardInput``) and the two registries: rewards by name, answer verifiers by task.

A reward is a pure function registered by name. Three kinds:

- a *sample* reward ``(sample: RewardInput, **options) -> float``, run in the trainer process: it must be
  cheap and must not parse model text with anything that can hang (format, language, overlong);
- a *sandboxed* sample reward, same signature, run in the verifier worker pool under a hard time limit
  (``accuracy``: it hands model text to sympy through math-verify);
- a *group* reward ``(samples, values, **options) -> list[float]`` over one GRPO group, run after the
  sample rewards; ``values[i]`` holds the sample rewards of ``samples[i]`` by name (Kimi-1.5's length reward
  reads ``accuracy``).

``options`` name ``RewardConfig`` fields that the scorer passes as keyword arguments of the same name.
A task verifier ``(answer: str, sample: RewardInput) -> float`` scores an extracted final answer for one
reasoning-gym task; ``accuracy`` dispatches on ``RewardInput.task`` and falls back to math-verify.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
Verifier = Callable[[str, "RewardInput"], float]
"""Scores an extracted final answer of one task: ``(answer, sample) -> float`` in [0, 1]."""


class RewardError(ValueError):
    """A reward cannot be computed as asked; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class RewardInput:
    """One sampled completion and what its rewards need to score it."""

    prompt: str
    """The user prompt (without the chat template); the language reward reads its script from here."""
    completion: str
    """The generated text after the prompt, special tokens removed."""
    answer: str = ""
    """Ground-truth final answer (reasoning-gym's ``answer`` field)."""
    task: str | None = None
    """Task name (reasoning-gym dataset name); picks the answer verifier. None: math-verify."""
    completion_tokens: int = 0
    """Length of the completion in tokens (the length rewards)."""
    max_tokens: int = 0
    """The rollout's generation limit in tokens (DAPO's L_max unless ``overlong_max_tokens`` is set)."""
    prefix_in_prompt: bool = False
    """True when the forced ``<think>\\n`` prefix was part of the prompt, so the completion starts inside
    the think block; False when the completion itself starts with ``<think>``."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Task metadata (reasoning-gym's ``metadata``: countdown reads ``numbers`` and ``target``); an optional
    ``language`` key (a script name of ``r1mega.rewards.language``) overrides the prompt's detected script."""
    group: str | None = None
    """GRPO group id for group rewards; None groups samples by identical prompt."""


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward and how the scorer calls it."""

    name: str
    fn: Callable[..., Any]
    sandboxed: bool = False
    """Run in the verifier pool under the time limit (never in the trainer process)."""
    group: bool = False
    """A group reward (called once per GRPO group) instead of a per-sample one."""
    options: tuple[str, ...] = ()
    """``RewardConfig`` fields passed to ``fn`` as keyword arguments of the same name."""
    requires: tuple[str, ...] = ()
    """Sample rewards a group reward reads; they must have a weight too (0 to only compute them)."""


REWARDS: dict[str, RewardSpec] = {}
"""Registered rewards by name."""

VERIFIERS: dict[str, Verifier] = {}
"""Registered answer verifiers by task name."""


def register_reward(
    name: str,
    *,
    sandboxed: bool = False,
    group: bool = False,
    options: Sequence[str] = (),
    requires: Sequence[str] = (),
) -> Callable[[F], F]:
    """Decorator: register ``fn`` as the reward ``name`` (see the module docstring for the kinds)."""
    if sandboxed and group:
        raise RewardError(f"Reward {name!r}: a group reward runs in-process; drop sandboxed=True.")

    def wrap(fn: F) -> F:
        old = REWARDS.get(name)
        if old is not None and _qualname(old.fn) != _qualname(fn):
            raise RewardError(f"Reward {name!r} is already registered by {_qualname(old.fn)}: pick another name.")
        REWARDS[name] = RewardSpec(name, fn, sandboxed, group, tuple(options), tuple(requires))
        return fn

    return wrap


def get_reward(name: str) -> RewardSpec:
    """The reward called ``name``; an unknown name raises with the valid ones."""
    try:
        return REWARDS[name]
    except KeyError:
        raise RewardError(f"Unknown reward {name!r}: choose from {', '.join(sorted(REWARDS))}.") from None


def register_verifier(task: str) -> Callable[[F], F]:
    """Decorator: register ``fn`` as the answer verifier of task ``task``."""

    def wrap(fn: F) -> F:
        old = VERIFIERS.get(task)
        if old is not None and _qualname(old) != _qualname(fn):
            raise RewardError(f"Task {task!r} already has the verifier {_qualname(old)}: register it once.")
        VERIFIERS[task] = fn
        return fn

    return wrap


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
