"""One table maps r1mega's errors to exit statuses: one meaning per status, one line per failure."""

from __future__ import annotations

import pytest

from r1mega.cli.exits import EXIT_CODES, ExitCode, _resolve, exit_code_for, fail, user_errors
from r1mega.config.errors import ConfigError
from r1mega.convert.verify import VerificationError
from r1mega.loop import NonFiniteError
from r1mega.pipeline.runner import PipelineError


def test_every_table_entry_names_a_real_exception() -> None:
    for path in EXIT_CODES:
        assert issubclass(_resolve(path), Exception), path


def test_each_status_means_one_thing() -> None:
    assert len({int(c) for c in ExitCode}) == len(ExitCode)
    assert ExitCode.PREEMPTED == 75 and ExitCode.USER_ERROR == 2


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (ConfigError("optim.lr", -1, "a positive number"), 2, "r1mega: config error: optim.lr"),
        (NonFiniteError("3 steps in a row"), 3, "r1mega: 3 steps in a row"),
        (VerificationError("verify: FAIL"), 4, "r1mega: verify: FAIL"),
        (PipelineError("sft exited with 1", 1), 1, "Re-run the same command to resume"),
        (PipelineError("sft exited with 2", 2), 1, "The step refused its input (exit 2)"),
    ],
)
def test_fail_prints_one_line_and_exits_with_the_table_status(error, code, line, capsys) -> None:
    assert exit_code_for(error) == code
    with pytest.raises(SystemExit) as exit_info:
        fail(error)
    assert exit_info.value.code == code
    assert line in capsys.readouterr().err


def test_bugs_are_not_turned_into_exit_codes() -> None:
    assert exit_code_for(KeyError("x")) is None
    with pytest.raises(KeyError), user_errors():
        raise KeyError("x")
