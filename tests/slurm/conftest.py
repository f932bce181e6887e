"""A real one-node Slurm cluster (slurmctld + slurmd + munged on localhost) for the sbatch tests.

Started once per session with ``slurm/local_cluster.sh``; skipped when Slurm is not installed or this is not
root, unless ``R1MEGA_REQUIRE_SLURM=1`` (set by ``.ci/run`` after installing it), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from slurm_utils import SLURM, Cluster, skip_or_fail

DAEMONS = ("sbatch", "scontrol", "scancel", "slurmctld", "slurmd", "munged")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[Cluster]:
    missing = [tool for tool in DAEMONS if shutil.which(tool) is None]
    if missing:
        skip_or_fail(f"Slurm is not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        skip_or_fail("a local Slurm cluster needs root (slurmd starts the job steps)")
    state = tmp_path_factory.mktemp("slurm_state")
    start = subprocess.run(
        ["bash", str(SLURM / "local_cluster.sh"), "start", str(state)], capture_output=True, text=True, timeout=120
    )
    if start.returncode != 0:
        logs = "".join(
            f"\n--- {log.name} ---\n{log.read_text()[-2000:]}" for log in sorted(state.glob("*.log")) if log.is_file()
        )
        subprocess.run(["bash", str(SLURM / "local_cluster.sh"), "stop", str(state)], timeout=60)
        skip_or_fail(f"the local Slurm cluster did not start: {start.stdout}{start.stderr}{logs}")
    cluster = Cluster(conf=state / "slurm.conf")
    try:
        yield cluster
    finally:
        for job_id in cluster.jobs:
            cluster.run("scancel", job_id)
        subprocess.run(["bash", str(SLURM / "local_cluster.sh"), "stop", str(state)], timeout=60)
