"""slurm/: the sbatch scripts on a real one-node Slurm cluster, preemption -> requeue -> resume, and lint.

The tiny DeepSeek-V3-style model trains with TP=2 over two CPU tasks (gloo) started by ``srun`` inside the
batch job. The uninterrupted job is the reference for the preempted one: after ``scancel --signal=USR1
--batch`` mid-run, the job checkpoints, requeues itself and finishes with the same step count and bit-identical
weights and optimizer state.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from ckpt_utils import assert_identical, checkpoint_tensors
from slurm_utils import (
    REPO,
    SLURM,
    STEPS,
    TRAIN_OVERRIDES,
    Cluster,
    final_checkpoint,
    job_env,
    latest_step,
    resumed_step,
    skip_or_fail,
)

SCRIPTS = sorted(p.relative_to(REPO) for p in [*SLURM.glob("*.sh"), *SLURM.glob("*.sbatch")])


def _record(run_dir: Path) -> list[str]:
    return (run_dir / "slurm_jobs.log").read_text().splitlines()


@pytest.mark.slow
def test_train_job_completes_with_the_expected_checkpoint(reference_job) -> None:
    job_id, cwd, info = reference_job
    log = (cwd / f"r1mega-train-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-4000:]}"
    run_dir = cwd / "runs" / f"r1mega-train-{job_id}"  # the default run folder: <submit dir>/runs/<name>-<job id>
    assert latest_step(run_dir) == STEPS
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").is_file()
    assert "2 process(es) via slurm: TP=2" in log, log[-3000:]
    config = (run_dir / "config.yaml").read_text()  # the resolved config, written by the trainer
    assert f"run_dir: {run_dir}" in config and "tensor_model_parallel_size: 2" in config
    record = _record(run_dir)
    assert record[0].split()[2:6] == ["start", f"job={job_id}", "restart=0", "nodes=" + info["NodeList"]]
    assert record[-1].split()[2:4] == ["end", f"job={job_id}"] and record[-1].endswith("exit=0")


@pytest.mark.slow
def test_preemption_checkpoints_requeues_and_resumes_bit_identically(
    slurm_cluster: Cluster, reference_job, tmp_path: Path
) -> None:
    ref_id, ref_cwd, ref_info = reference_job
    assert ref_info["JobState"] == "COMPLETED", ref_info
    job_id = slurm_cluster.submit(["sbatch", "--ntasks=2", str(SLURM / "train.sbatch"), *TRAIN_OVERRIDES], tmp_path)
    out = tmp_path / f"r1mega-train-{job_id}.out"
    info, times, log = slurm_cluster.preempt_and_wait(job_id, out, start_timeout=240, finish_timeout=300)
    print(f"\nUSR1 -> requeued/pending/running/finished (s): {times}")  # both runs' log, appended
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log[-4000:]}"

    run_dir = tmp_path / "runs" / f"r1mega-train-{job_id}"
    resumed_step(log, run_dir, STEPS)
    assert log.count("via slurm: TP=2") == 2 and "received USR1" in log
    events = [line.split()[2:5] for line in _record(run_dir)]
    assert events == [
        ["start", f"job={job_id}", "restart=0"],
        ["requeue", f"job={job_id}", "restart=0"],
        ["start", f"job={job_id}", "restart=1"],
        ["end", f"job={job_id}", "restart=1"],
    ], events
    assert _record(run_dir)[1].endswith("exit=75") and _record(run_dir)[-1].endswith("exit=0")
    assert latest_step(run_dir) == STEPS

    reference = final_checkpoint(ref_cwd / "runs" / f"r1mega-train-{ref_id}")
    assert_identical(checkpoint_tensors(reference), checkpoint_tensors(final_checkpoint(run_dir)))


def test_scripts_exist() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"common.sh", "local_cluster.sh", "submit.sh", "train.sbatch", "pipeline.sbatch", "convert.sbatch"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=str)
def test_bash_n(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=str)
def test_shellcheck(script: Path) -> None:
    if shutil.which("shellcheck") is None:
        skip_or_fail("shellcheck is not installed: apt-get install shellcheck")
    proc = subprocess.run(["shellcheck", "-x", str(script)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _dry_run(cmd: list[str], **extra: str) -> subprocess.CompletedProcess:
    env = job_env({"R1MEGA_DRY_RUN": "1", **extra})
    return subprocess.run(["bash", *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_pipeline_and_convert_dry_runs_print_the_srun_command(tmp_path: Path) -> None:
    pipeline = _dry_run([str(SLURM / "pipeline.sbatch"), "model=qwen2_5_7b", f"run_dir={tmp_path}/p"])
    assert pipeline.returncode == 0, pipeline.stderr
    assert pipeline.stdout.split() == [
        "srun",
        "--kill-on-bad-exit=0",
        "--wait=120",
        "r1mega-pipeline",
        "model=qwen2_5_7b",
        f"run_dir={tmp_path}/p",
    ]
    image = tmp_path / "r1mega.sif"
    convert = _dry_run(
        [str(SLURM / "convert.sbatch"), "import", "--hf", "hf dir", "--out", "ckpt"],
        R1MEGA_CONTAINER=str(image),
        R1MEGA_SRUN_ARGS="--label",
    )
    assert convert.returncode == 0, convert.stderr
    assert convert.stdout.strip().endswith(
        f"apptainer exec --nv {image} r1mega-convert import --hf hf\\ dir --out ckpt"
    )
    assert "--label" in convert.stdout
    assert _dry_run([str(SLURM / "convert.sbatch"), "upload"]).returncode == 2
    assert not tmp_path.joinpath("p").exists(), "a dry run creates nothing"


def test_train_run_dir_defaults_to_job_name_and_id() -> None:
    train = _dry_run([str(SLURM / "train.sbatch"), "optim.lr=1e-3"], SLURM_JOB_ID="42", SLURM_JOB_NAME="sft")
    assert train.returncode == 0, train.stderr
    assert train.stdout.split()[-2:] == ["optim.lr=1e-3", f"run_dir={REPO}/runs/sft-42"]


def test_submit_checks_the_layout_for_the_world_size_first() -> None:
    """The README's DeepSeek-V3 launch: r1mega-check refuses 1 node of 8 GPUs, accepts 256 nodes."""
    args = [str(SLURM / "submit.sh"), "train", "model=deepseek_v3", "parallel=dsv3_2048", "precision=bf16"]
    small = _dry_run(args, R1MEGA_NODES="1")
    assert small.returncode == 2 and "not submitted" in small.stderr, small.stderr
    full = _dry_run(args, R1MEGA_NODES="256", R1MEGA_PARTITION="gpu", R1MEGA_TIME="2-00:00:00")
    assert full.returncode == 0 and "config OK" in full.stderr, full.stderr
    assert full.stdout.split()[:6] == [
        "sbatch",
        "--nodes=256",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--time=2-00:00:00",
    ]
    assert os.path.basename(full.stdout.split()[6]) == "train.sbatch"


def test_preempted_exit_code_matches_the_trainer() -> None:
    from r1mega.cli.exits import ExitCode

    assert f"R1MEGA_PREEMPTED={int(ExitCode.PREEMPTED)}\n" in (SLURM / "common.sh").read_text()
