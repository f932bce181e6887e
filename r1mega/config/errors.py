"""The one error type users see for a bad configuration."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work: names the dotted key, the value and what is valid.

    Entry points print ``str(error)`` as one line and exit with code 2.
    """

    def __init__(self, key: str, value: object, valid: str) -> None:
        self.key = key
        self.value = value
        self.valid = valid
        super().__init__(f"{key}={value!r} is invalid: expected {valid}")
