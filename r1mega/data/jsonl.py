"""Reading a JSONL data file record by record, with errors that name ``file:line``.

Every r1mega data reader (SFT records, preference pairs, prompt sets) goes through :func:`read_records`: a
missing file, a line that is not JSON or a record its parser rejects raises the reader's own error type
naming the file and line; with ``skip_malformed`` such lines are skipped, counted and logged instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from r1mega.utils.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")

_MAX_SKIP_WARNINGS = 10


def read_records(
    path: str | Path,
    parse: Callable[[Any, str], T],
    error: type[Exception],
    what: str,
    item: str,
    skip_malformed: bool = False,
) -> tuple[list[T], int]:
    """``parse(record, default_id)`` of every non-blank line of ``path``; returns (items, lines skipped).

    ``parse`` raises ``ValueError`` for a record it cannot use (``default_id`` is ``<file name>:<line>``, for
    records without an ``id``). ``error`` is raised for a missing file, a malformed line (unless
    ``skip_malformed``) or a file with nothing usable; ``what`` names the data and ``item`` a record in messages ("SFT", "example").
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"No {what} data file at {str(path)!r}: give the path of a JSONL file.")
    items: list[T] = []
    skipped = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
                items.append(parse(record, f"{path.name}:{lineno}"))
            except ValueError as e:
                message = f"{path}:{lineno}: {e}."
                if not skip_malformed:
                    raise error(message + " Fix the line, or skip malformed lines.") from None
                skipped += 1
                if skipped <= _MAX_SKIP_WARNINGS:
                    log.warning("Skipping malformed %s line %s", what, message)
    if skipped:
        log.warning("Skipped %d malformed line(s) of %s; kept %d", skipped, path, len(items))
    if not items:
        raise error(f"{path} holds no usable {what} {item}.")
    return items, skipped
