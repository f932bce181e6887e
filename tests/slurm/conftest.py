"""Real Slurm clusters on this machine for the sbatch, submitit and multi-node tests: one node (slurmctld + slurmd +
munged on localhost) and two nodes (two slurmds, each in its own network namespace with its own hostname; the
controller on the first).

Each is started once per session with ``slurm/local_cluster.sh``; skipped when Slurm is not installed or this is not
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
NETNS_TOOLS = ("ip", "nsenter", "unshare")


def _cluster(tmp_path_factory, nodes: int) -> Iterator[Cluster]:
    """Start a ``nodes``-node cluster, yield it, cancel its jobs and stop it."""
    missing = [tool for tool in DAEMONS + (NETNS_TOOLS if nodes > 1 else ()) if shutil.which(tool) is None]
    if missing:
        skip_or_fail(f"missing {', '.join(missing)}: apt-get install slurm-wlm munge (and iproute2 util-linux)")
    if os.geteuid() != 0:
        skip_or_fail("a local Slurm cluster needs root (slurmd starts the job steps)")
    state = tmp_path_factory.mktemp(f"slurm_state_{nodes}node")
    # Ports and job ids of their own: another checkout's tests may run a cluster on this machine at the same time.
    env = {"SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port()), "FIRST_JOB_ID": str(random_job_id())}
    start = subprocess.run(
        ["bash", str(SLURM / "local_cluster.sh"), "start", str(state), str(nodes)],
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
        skip_or_fail(f"the local {nodes}-node Slurm cluster did not start: {start.stdout}{start.stderr}{logs}")
    client = [] if nodes == 1 else ["bash", str(SLURM / "local_cluster.sh"), "exec", str(state)]
    cluster = Cluster(conf=state / "slurm.conf", client=client)
    try:
        yield cluster
    finally:
        for job_id in cluster.jobs:
            cluster.run("scancel", job_id)
        subprocess.run(["bash", str(SLURM / "local_cluster.sh"), "stop", str(state)], timeout=60)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[Cluster]:
    """One node: this machine, clients find it through SLURM_CONF."""
    yield from _cluster(tmp_path_factory, 1)


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory) -> Iterator[Cluster]:
    """Two nodes, r1node1 and r1node2, separate hosts joined by a veth pair; clients run on r1node1."""
    yield from _cluster(tmp_path_factory, 2)


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
