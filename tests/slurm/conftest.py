"""A real one-node Slurm cluster (slurmctld + slurmd + munged on localhost) for the sbatch tests.

Started once per session with ``slurm/local_cluster.sh``; skipped when Slurm is not installed or this is not
root, unless ``R1MEGA_REQUIRE_SLURM=1`` (set by ``.ci/run`` after installing it), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dist_utils import free_port
from slurm_utils import SLURM, TRAIN_OVERRIDES, Cluster, random_job_id, skip_or_fail

DAEMONS = ("sbatch", "scontrol", "scancel", "slurmctld", "slurmd", "munged")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[Cluster]:
    missing = [tool for tool in DAEMONS if shutil.which(tool) is None]
    if missing:
        skip_or_fail(f"Slurm is not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        skip_or_fail("a local Slurm cluster needs root (slurmd starts the job steps)")
    state = tmp_path_factory.mktemp("slurm_state")
    # Ports and job ids of their own: another checkout's tests may run a cluster on this machine at the same time.
    env = {"SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port()), "FIRST_JOB_ID": str(random_job_id())}
    start = subprocess.run(
        ["bash", str(SLURM / "local_cluster.sh"), "start", str(state)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
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


@pytest.fixture(scope="session")
def reference_job(slurm_cluster: Cluster, tmp_path_factory) -> tuple[str, Path, dict[str, str]]:
    """The tiny run, uninterrupted, submitted through slurm/submit.sh (r1mega-check first) with 2 CPU tasks: the
    run every preempted one-node job (train.sbatch, the submitit sweep) must match bit for bit."""
    cwd = tmp_path_factory.mktemp("reference")
    job_id = slurm_cluster.submit(
        ["bash", str(SLURM / "submit.sh"), "train", *TRAIN_OVERRIDES],
        cwd,
        R1MEGA_GPUS_PER_NODE="0",
        R1MEGA_TASKS_PER_NODE="2",
    )
    info = slurm_cluster.wait(job_id)
    return job_id, cwd, info
