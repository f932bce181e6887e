"""Two Slurm nodes on one machine (``slurm/local_cluster.sh start DIR 2``): r1node1 and r1node2, each with its own
network namespace, hostname, /etc/hosts and slurmd, joined by a veth pair. A 2-node x 2-task train.sbatch job runs
TP=2 inside each node and DP=2 across the two (gloo over the veth pair, the rendezvous on r1node1); preempted with
``scancel --signal=USR1 --batch`` mid-run, it checkpoints, requeues itself and finishes with the step count and the
bit-identical weights and optimizer state of the uninterrupted 2-node job."""

from __future__ import annotations

from pathlib import Path

import pytest
from ckpt_utils import assert_identical, checkpoint_tensors
from slurm_utils import SLURM, STEPS, TRAIN_OVERRIDES, Cluster, final_checkpoint, latest_step, resumed_step

LAYOUT = [*TRAIN_OVERRIDES, "parallel.world_size=4"]  # parallel=tp2 on 4 ranks: TP=2 x DP=2
NODES = "r1node[1-2]"


def test_the_two_nodes_are_separate_hosts(two_node_cluster: Cluster) -> None:
    """srun's block distribution puts ranks 0-1 (one TP group) on r1node1 and 2-3 on r1node2, each seeing only its
    own address; both resolve r1node1 (the rendezvous host) to the first node's address."""
    script = 'echo "$SLURM_PROCID $(hostname) $(hostname -I) $(getent hosts r1node1)"'
    out = two_node_cluster.run("srun", "--nodes=2", "--ntasks-per-node=2", "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    rows = sorted(line.split() for line in out.stdout.splitlines())
    assert rows == [
        ["0", "r1node1", "10.231.0.1", "10.231.0.1", "r1node1"],
        ["1", "r1node1", "10.231.0.1", "10.231.0.1", "r1node1"],
        ["2", "r1node2", "10.231.0.2", "10.231.0.1", "r1node1"],
        ["3", "r1node2", "10.231.0.2", "10.231.0.1", "r1node1"],
    ], out.stdout


@pytest.fixture(scope="module")
def two_node_reference(two_node_cluster: Cluster, tmp_path_factory) -> tuple[str, Path, dict[str, str]]:
    """The tiny run on 2 nodes x 2 CPU tasks, uninterrupted, through slurm/submit.sh (r1mega-check for 4 ranks)."""
    cwd = tmp_path_factory.mktemp("two_node_reference")
    job_id = two_node_cluster.submit(
        ["bash", str(SLURM / "submit.sh"), "train", *LAYOUT],
        cwd,
        R1MEGA_NODES="2",
        R1MEGA_GPUS_PER_NODE="0",
        R1MEGA_TASKS_PER_NODE="2",
    )
    return job_id, cwd, two_node_cluster.wait(job_id, timeout=400)


@pytest.mark.slow
def test_a_two_node_job_trains_tp_inside_and_dp_across_nodes(two_node_reference) -> None:
    job_id, cwd, info = two_node_reference
    log = (cwd / f"r1mega-train-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-4000:]}"
    assert info["NodeList"] == NODES and info["NumNodes"] == "2" and info["NumTasks"] == "4", info
    assert "4 process(es) via slurm: TP=2 PP=1 CP=1 EP=1 ETP=2 DP=2" in log, log[-3000:]
    run_dir = cwd / "runs" / f"r1mega-train-{job_id}"
    assert latest_step(run_dir) == STEPS
    start = (run_dir / "slurm_jobs.log").read_text().splitlines()[0].split()
    assert start[2:7] == ["start", f"job={job_id}", "restart=0", f"nodes={NODES}", "tasks=4"], start


@pytest.mark.slow
def test_a_two_node_job_is_preempted_requeued_and_resumes_bit_identically(
    two_node_cluster: Cluster, two_node_reference, tmp_path: Path
) -> None:
    ref_id, ref_cwd, ref_info = two_node_reference
    assert ref_info["JobState"] == "COMPLETED", ref_info
    sbatch = ["sbatch", "--nodes=2", "--ntasks-per-node=2", str(SLURM / "train.sbatch"), *LAYOUT]
    job_id = two_node_cluster.submit(sbatch, tmp_path)
    out = tmp_path / f"r1mega-train-{job_id}.out"
    info, times, log = two_node_cluster.preempt_and_wait(job_id, out, start_timeout=300, finish_timeout=400)
    print(f"\n2 nodes: USR1 -> requeued/pending/running/finished (s): {times}")  # both runs' log, appended
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log[-4000:]}"
    assert info["NodeList"] == NODES, info

    run_dir = tmp_path / "runs" / f"r1mega-train-{job_id}"
    resumed_step(log, run_dir, STEPS)
    assert log.count("4 process(es) via slurm: TP=2 PP=1 CP=1 EP=1 ETP=2 DP=2") == 2
    events = [line.split()[2:7] for line in (run_dir / "slurm_jobs.log").read_text().splitlines()]
    assert [e[0] for e in events] == ["start", "requeue", "start", "end"], events
    assert all(e[3:] == [f"nodes={NODES}", "tasks=4"] for e in events), events
    assert latest_step(run_dir) == STEPS

    reference = final_checkpoint(ref_cwd / "runs" / f"r1mega-train-{ref_id}")
    assert_identical(checkpoint_tensors(reference), checkpoint_tensors(final_checkpoint(run_dir)))
