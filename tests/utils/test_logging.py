"""Clean logs: the third-party warnings a user cannot act on are quiet, in a real run that resumes; others show."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import zygote

from r1mega.utils.logging import QUIET_WARNINGS, quiet_known_warnings

QUICK = ["logging.progress_bar=false", "data.seq_length=32", "optim.lr_warmup_steps=0"]


def test_a_run_and_its_resume_print_no_known_third_party_warning(tmp_path: Path) -> None:
    first = zygote.run(["-m", "r1mega.cli.train", "optim.train_steps=2", f"run_dir={tmp_path}", *QUICK])
    resumed = zygote.run(["-m", "r1mega.cli.train", "optim.train_steps=3", f"run_dir={tmp_path}", *QUICK])
    assert first.returncode == 0 and resumed.returncode == 0, (first.stderr[-2000:], resumed.stderr[-2000:])
    assert "resumed from" in resumed.stderr  # the checkpoint load path, where torch's FutureWarnings came from
    for proc in (first, resumed):
        assert "Warning" not in proc.stderr, proc.stderr[-3000:]


def test_only_the_listed_warnings_are_quiet() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn("full scope is deprecated. Use empty cuda_graph_scope", UserWarning, stacklevel=1)
        warnings.warn("`load_state_dict` is deprecated and will be removed", FutureWarning, stacklevel=1)
        warnings.warn("data.seq_length is longer than any sample", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["data.seq_length is longer than any sample"]
    assert len(QUIET_WARNINGS) == 4


@pytest.mark.parametrize(("message", "category"), QUIET_WARNINGS)
def test_each_quiet_pattern_is_a_valid_filter(message: str, category: type[Warning]) -> None:
    import re

    re.compile(message)
    assert issubclass(category, Warning)


def test_r1mega_eval_imports_megatron_quietly(tmp_path: Path) -> None:
    """r1mega-eval's app imports megatron-core before the job sets up logging: the entry point quiets the known
    warnings first. A fresh interpreter (the zygote has imported megatron-core already); the run stops at its
    missing prompt file, after the imports."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "r1mega.cli.eval", f"run_dir={tmp_path}"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "data.eval_path=None is invalid" in proc.stderr, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
