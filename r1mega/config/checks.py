"""Checks the config schemas share (``r1mega.config.schema`` and ``schema_rl``)."""

from __future__ import annotations

from r1mega.config.errors import ConfigError


def check_choice(key: str, value: object, choices: tuple) -> None:
    """``value`` of ``key`` is one of ``choices``, else a one-line ConfigError listing them."""
    if value not in choices:
        raise ConfigError(key, value, f"one of {', '.join(map(str, choices))}")


def check_positive(key: str, value: float | None, allow_none: bool = False) -> None:
    """``value`` of ``key`` is a positive number (or None when ``allow_none``)."""
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(key, value, "a positive number")
