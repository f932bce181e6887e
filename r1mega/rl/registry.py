"""Name -> function registries for the RL maths (verl's ``register_adv_est`` pattern).

Each kind of function (advantage estimators, policy losses, loss-aggregation modes, KL estimators) has
one :class:`Registry`. Config strings such as ``grpo.loss.adv_estimator=dr_grpo`` name entries, and a
lookup miss raises a ``KeyError`` that lists the valid names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """Functions of one kind, by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        """What the entries are, for error messages ("advantage estimator", "policy loss", ...)."""
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator that registers a function under ``name``; registering a name twice raises ``ValueError``."""

        def decorator(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> F:
        """The function called ``name``; an unknown name raises ``KeyError`` listing the valid ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def names(self) -> tuple[str, ...]:
        """The registered names, sorted."""
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries
