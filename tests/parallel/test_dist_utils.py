"""The test harness's multi-process runner: ports outside the ephemeral range, and a retry when a rendezvous
port was taken first (CI failed once on EADDRINUSE)."""

from pathlib import Path

import pytest
from dist_utils import _ephemeral_low, free_port, run_ranks

SCRIPT = """
import os, sys
marker = sys.argv[1]
if not os.path.exists(marker):
    open(marker, "w").close()
    raise SystemExit("DistNetworkError: ... EADDRINUSE, message: address already in use")
print("rank", os.environ["RANK"], "port", os.environ["MASTER_PORT"])
"""


def test_free_ports_are_below_the_ephemeral_range() -> None:
    ports = {free_port() for _ in range(20)}
    assert all(15000 <= p < _ephemeral_low() for p in ports), ports


def test_a_taken_rendezvous_port_starts_the_ranks_again(tmp_path: Path) -> None:
    script = tmp_path / "flaky.py"
    script.write_text(SCRIPT)
    outputs = run_ranks(str(script), [str(tmp_path / "tried")], world_size=1, timeout=60)
    assert outputs[0].startswith("rank 0 port "), outputs


def test_other_failures_are_not_retried(tmp_path: Path) -> None:
    script = tmp_path / "broken.py"
    script.write_text("import sys\nopen(sys.argv[1], 'a').write('x')\nraise SystemExit('a real failure')\n")
    with pytest.raises(AssertionError, match="a real failure"):
        run_ranks(str(script), [str(tmp_path / "runs")], world_size=1, timeout=60, attempts=5)
    assert (tmp_path / "runs").read_text() == "x"  # one run: only a taken port starts the ranks again
