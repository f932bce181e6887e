"""The one table from what went wrong to the exit status of every r1mega console script.

``r1mega-train``, ``r1mega-eval``, ``r1mega-rejection-sample``, ``r1mega-check``, ``r1mega-pipeline`` and
``r1mega-convert`` print one line (``prog: Kind: message``) and exit with the status below; ``slurm/common.sh``
names ``PREEMPTED`` once for the shell (``R1MEGA_PREEMPTED``; tests/slurm checks the two agree).

Exception classes are named as ``"module:Class"`` and resolved only when an error is being mapped, so the table
costs no imports of torch or megatron-core at start-up.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import NoReturn


class ExitCode(IntEnum):
    """Exit statuses, one meaning each."""

    OK = 0
    STEP_FAILED = 1
    """A pipeline step failed; re-running the same command resumes from it."""
    USER_ERROR = 2
    """Bad input: a config, data file, tokenizer or checkpoint that cannot be used, a model that cannot be converted."""
    NON_FINITE = 3
    """Training stopped: the loss or gradients stayed non-finite."""
    VERIFY_FAILED = 4
    """A conversion's logit audit failed: the two models disagree."""
    PREEMPTED = 75
    """Stopped on request (SIGTERM/SIGUSR1) after saving a checkpoint: requeue and resume (EX_TEMPFAIL)."""


EXIT_CODES: dict[str, ExitCode] = {
    "r1mega.config.errors:ConfigError": ExitCode.USER_ERROR,
    "r1mega.data.sft:SFTDataError": ExitCode.USER_ERROR,
    "r1mega.data.prompts:PromptDataError": ExitCode.USER_ERROR,
    "r1mega.data.tokenizer:TokenizerError": ExitCode.USER_ERROR,
    "r1mega.checkpoint.errors:CheckpointError": ExitCode.USER_ERROR,
    "r1mega.convert.adapter:ConvertError": ExitCode.USER_ERROR,
    "r1mega.loop:NonFiniteError": ExitCode.NON_FINITE,
    "r1mega.convert.verify:VerificationError": ExitCode.VERIFY_FAILED,
    "r1mega.pipeline.runner:PipelineError": ExitCode.STEP_FAILED,
}
"""Exception class (``module:Class``) -> exit status. Subclasses map like their base."""

_LABELS = {"ConfigError": "config error", "NonFiniteError": None, "VerificationError": None, "PipelineError": None}
"""How a kind is named in the one-line message (None: the message says it itself)."""
RESUME_HINT = "Re-run the same command to resume from this step."
INPUT_HINT = (
    "The step refused its input (exit 2): fix that, then re-run the same command (completed steps are skipped)."
)


def _hint(error: BaseException) -> str:
    """What to do next, printed after the message: only a pipeline failure has a next step."""
    if type(error).__name__ != "PipelineError":
        return ""
    return INPUT_HINT if getattr(error, "step_exit_code", None) == ExitCode.USER_ERROR else RESUME_HINT


def _resolve(path: str) -> type[BaseException]:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def exit_code_for(error: BaseException) -> ExitCode | None:
    """The status for ``error``, or None when it is not a user-facing error (a bug: let it raise)."""
    for path, code in EXIT_CODES.items():
        # An instance of a class means its module is loaded: modules not imported yet are skipped, not imported.
        if path.split(":")[0] in sys.modules and isinstance(error, _resolve(path)):
            return code
    return None


def fail(error: BaseException, prog: str = "r1mega") -> NoReturn:
    """Print ``error`` as one line and exit with its status from the table."""
    code = exit_code_for(error)
    if code is None:
        raise error
    kind = type(error).__name__
    label = _LABELS.get(kind, kind)
    hint = f"\n{_hint(error)}" if _hint(error) else ""
    print(f"{prog}: {label}: {error}{hint}" if label else f"{prog}: {error}{hint}", file=sys.stderr)
    sys.exit(int(code))


@contextmanager
def user_errors(prog: str = "r1mega") -> Iterator[None]:
    """Turn the table's exceptions raised inside the block into one line and their exit status."""
    try:
        yield
    except Exception as e:
        if exit_code_for(e) is None:
            raise
        fail(e, prog)
