"""``r1mega-train -m hydra/launcher=submitit_slurm``: a Hydra sweep submitted by hydra-submitit-launcher to the real
local Slurm cluster, one array task of 2 CPU tasks (TP=2) per point, each in its own run folder under
``hydra.sweep.dir``. One task is preempted with submitit's signal (USR2) mid-run: it checkpoints, requeues itself
(``scontrol requeue <array job>_<task>``) and finishes bit-identical to the uninterrupted train.sbatch job."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from ckpt_utils import assert_identical, checkpoint_tensors
from slurm_utils import STEPS, TRAIN_OVERRIDES, Cluster, final_checkpoint, latest_step, skip_or_fail

SHORT = 4
"""The sweep's second point trains this many steps (the sweep is over optim.train_steps)."""


def _launcher_installed() -> None:
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        skip_or_fail("hydra-submitit-launcher is not installed: pip install -e '.[slurm]'")


def _task_log(sweep: Path, task: int) -> Path | None:
    """Rank 0's stderr of array task ``task`` (submitit's ``.submitit/<array job>_<task>/..._0_log.err``)."""
    logs = sorted(sweep.glob(f".submitit/*_{task}/*_{task}_0_log.err"))
    return logs[0] if logs else None


def _wait_for(predicate, what: str, launcher: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if launcher.poll() is not None:
            raise AssertionError(f"the sweep ended (exit {launcher.returncode}) before {what}")
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.5)


@pytest.mark.slow
def test_submitit_sweep_preempts_requeues_and_resumes_bit_identically(
    slurm_cluster: Cluster, reference_job, tmp_path: Path
) -> None:
    _launcher_installed()
    ref_id, ref_cwd, ref_info = reference_job
    assert ref_info["JobState"] == "COMPLETED", ref_info
    sweep = tmp_path / "sweep"
    overrides = [o for o in TRAIN_OVERRIDES if not o.startswith("optim.train_steps=")]
    cmd = [
        shutil.which("r1mega-train", path=slurm_cluster.env()["PATH"]),
        "-m",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=30",
        f"hydra.sweep.dir={sweep}",
        *overrides,
        f"optim.train_steps={STEPS},{SHORT}",
    ]
    out = tmp_path / "launcher.log"
    with out.open("w") as log:  # it waits for the whole sweep, like any Hydra launcher
        launcher = subprocess.Popen(cmd, cwd=tmp_path, env=slurm_cluster.env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _task_log(sweep, 0) is not None, "array task 0", launcher)
        log0 = _task_log(sweep, 0)
        job0 = log0.parent.name  # <array job>_0
        slurm_cluster.jobs.append(job0.split("_")[0])
        _wait_for(lambda: "step 3 " in log0.read_text(), "step 3 in task 0", launcher)
        signalled = time.monotonic()
        sent = slurm_cluster.run("scancel", "--signal=USR2", job0)  # submitit's signal, to every task
        assert sent.returncode == 0, sent.stderr
        times = {}
        while launcher.poll() is None:
            if slurm_cluster.job(job0).get("Restarts") == "1":
                times.setdefault("requeued", time.monotonic() - signalled)
            if "resumed from" in log0.read_text():
                times.setdefault("resumed", time.monotonic() - signalled)
            assert time.monotonic() - signalled < 400, f"sweep not finished: {slurm_cluster.job(job0)}"
            time.sleep(0.5)
        times["sweep finished"] = time.monotonic() - signalled
        print(f"\nUSR2 -> requeued/resumed/sweep finished (s): {times}")
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = log0.read_text()  # both runs of task 0 (submitit appends)
    assert launcher.returncode == 0, f"{out.read_text()[-3000:]}\n{text[-3000:]}"

    info = slurm_cluster.wait(job0)  # the tasks wrote their results; the batch step may still be ending
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    stopped = re.search(r"stopped at step (\d+) on request; checkpoint saved", text)
    assert stopped, text[-4000:]
    k = int(stopped.group(1))
    assert 3 <= k < STEPS
    assert f"requeued job {job0}" in text and "received SIGUSR2" in text, text[-4000:]
    run0, run1 = sweep / "0", sweep / "1"
    assert f"resumed from {run0 / 'checkpoints' / f'step_{k:08d}'} (step {k})" in text, text[-4000:]
    assert text.count("2 process(es) via slurm: TP=2") == 2

    # each job in its own run folder, the Hydra job folder under hydra.sweep.dir
    for run, steps in ((run0, STEPS), (run1, SHORT)):
        assert f"run_dir: {run}\n" in (run / "config.yaml").read_text()
        assert f"- optim.train_steps={steps}" in (run / ".hydra" / "overrides.yaml").read_text()
        assert latest_step(run) == steps
    job1 = _task_log(sweep, 1).parent.name
    assert slurm_cluster.wait(job1)["Restarts"] == "0"

    reference = final_checkpoint(ref_cwd / "runs" / f"r1mega-train-{ref_id}")
    assert_identical(checkpoint_tensors(reference), checkpoint_tensors(final_checkpoint(run0)))
