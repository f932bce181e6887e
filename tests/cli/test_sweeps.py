"""Hydra multirun (``-m``) for every Hydra app: each point of a sweep checked before any job runs, each job in its
own run folder under ``hydra.sweep.dir``, a failed job reported without stopping the others. (The sweep on Slurm,
through hydra-submitit-launcher, is tests/slurm/test_submitit.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import yaml
from dist_utils import free_port
from generation_utils import job_args, make_checkpoint, make_prompt_data
from zygote import run, spawn

from r1mega.cli.sweeps import sweep_jobs

HYDRA_APPS = ("r1mega.cli.train", "r1mega.cli.eval", "r1mega.cli.rejection_sample")
QUICK = ["optim.train_steps=3", "optim.lr_warmup_steps=0", "data.seq_length=32", "logging.progress_bar=false"]


def _app(module: str, *args: str, timeout: float = 300) -> tuple[int, str]:
    proc = run(["-m", module, *args], timeout=timeout)
    return proc.returncode, proc.stderr


def _losses(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"lm_loss=([\d.]+)", log)]


def test_sweep_jobs_are_hydras_product_in_hydras_order() -> None:
    jobs = sweep_jobs(["optim.lr=1e-3,1e-4", "seed=7", "model=glob(dsv3_tiny*)"])
    assert jobs == [
        ["optim.lr=0.001", "seed=7", "model=dsv3_tiny"],
        ["optim.lr=0.0001", "seed=7", "model=dsv3_tiny"],
    ]
    assert sweep_jobs(["seed=range(1,4)"]) == [["seed=1"], ["seed=2"], ["seed=3"]]


def test_a_sweep_value_without_multirun_says_to_add_m() -> None:
    code, err = _app("r1mega.cli.train", "optim.lr=1e-3,1e-4")
    assert code == 2
    assert err.strip() == (
        "r1mega: config error: optim.lr='1e-3,1e-4' is invalid: expected one value; "
        "to run one job per value, add -m (Hydra's --multirun)"
    )


@pytest.mark.parametrize("module", HYDRA_APPS)
def test_every_job_of_a_sweep_is_checked_before_any_runs(module: str, tmp_path: Path) -> None:
    """Job #1 has a warm-up as long as the run: refused in one line, naming the job, before job #0 starts."""
    code, err = _app(module, "-m", "optim.lr_warmup_steps=0,60", f"hydra.sweep.dir={tmp_path / 's'}")
    assert code == 2, err[-2000:]
    assert err.startswith("r1mega: config error: optim.lr_warmup_steps=60 is invalid") and err.count("\n") == 1, err
    assert "(sweep job #1: optim.lr_warmup_steps=60)" in err
    assert not (tmp_path / "s").exists(), "nothing ran"


def test_one_run_dir_for_a_whole_sweep_is_refused(tmp_path: Path) -> None:
    code, err = _app("r1mega.cli.train", "-m", "seed=1,2", f"run_dir={tmp_path / 'r'}")
    assert code == 2 and "each job runs in <hydra.sweep.dir>/<job number>" in err, err


@pytest.mark.slow
def test_a_train_sweep_runs_each_job_in_its_own_run_dir(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    code, err = _app("r1mega.cli.train", "-m", "optim.lr=3e-3,3e-4", *QUICK, f"hydra.sweep.dir={sweep}")
    assert code == 0, err[-3000:]
    losses = _losses(err)
    assert len(losses) == 6 and losses[:3] != losses[3:], losses  # both jobs logged (Hydra disables loggers)
    for job, lr in ((0, 3e-3), (1, 3e-4)):
        run_dir = sweep / str(job)
        config = yaml.safe_load((run_dir / "config.yaml").read_text())  # the trainer's resolved config
        assert config["run_dir"] == str(run_dir) and config["optim"]["lr"] == lr
        assert (run_dir / "checkpoints" / "step_00000003" / "meta.json").is_file()
        assert list((run_dir / "tb").glob("events.out.tfevents.*"))
        assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert (sweep / "multirun.yaml").is_file()
    # the same sweep again, same hydra.sweep.dir: each job resumes from its own newest checkpoint
    code, err = _app("r1mega.cli.train", "-m", "optim.lr=3e-3,3e-4", *QUICK, f"hydra.sweep.dir={sweep}")
    assert code == 0, err[-3000:]
    for job in (0, 1):
        assert f"resumed from {sweep / str(job) / 'checkpoints' / 'step_00000003'} (step 3)" in err, err[-3000:]


@pytest.mark.slow
def test_a_sweep_run_by_two_ranks_gives_each_job_its_own_rendezvous(tmp_path: Path) -> None:
    """Two ranks started the way srun does, each running the same 2-job sweep: job 1 must not find job 0's
    rendezvous (the same port used to end in gloo's "connectFullMesh failed")."""
    sweep, port, procs, logs = tmp_path / "sweep", free_port(), [], []
    args = ["-m", "r1mega.cli.train", "-m", "parallel=tp2", "optim.lr=3e-3,3e-4", *QUICK, f"hydra.sweep.dir={sweep}"]
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_NODELIST="127.0.0.1")
        env.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        logs.append(tmp_path / f"rank{rank}.log")
        procs.append(spawn(args, env, logs[-1]))
    try:
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert codes == [0, 0], logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
    assert logs[0].read_text().count("2 process(es) via slurm: TP=2") == 2
    for job in (0, 1):
        assert (sweep / str(job) / "checkpoints" / "latest").read_text().strip() == "step_00000003"


@pytest.mark.slow
def test_a_failed_job_is_reported_the_others_run_and_the_status_is_its_own(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    missing = tmp_path / "no_such_checkpoint"
    code, err = _app("r1mega.cli.train", "-m", f"checkpoint.load={missing},null", *QUICK, f"hydra.sweep.dir={sweep}")
    assert code == 2, err[-3000:]  # CheckpointError's status, not Hydra's 1
    assert f"Error executing job with overrides: ['checkpoint.load={missing}'" in err
    assert err.strip().splitlines()[-1].startswith("r1mega: CheckpointError: ")
    assert not (sweep / "0" / "checkpoints" / "latest").exists()
    assert (sweep / "1" / "checkpoints" / "latest").read_text().strip() == "step_00000003"


@pytest.fixture(scope="module")
def prompts_and_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("generation")
    return make_prompt_data(root / "data"), make_checkpoint(root / "ckpt")


@pytest.mark.slow
def test_eval_and_rejection_sampling_sweeps_write_per_job_outputs(prompts_and_checkpoint, tmp_path: Path) -> None:
    data, ckpt = prompts_and_checkpoint
    code, err = _app(
        "r1mega.cli.eval",
        "-m",
        *job_args(data, ckpt),
        "eval.samples=1,2",
        "eval.max_prompts=2",
        "eval.max_new_tokens=4",
        f"hydra.sweep.dir={tmp_path / 'eval'}",
    )
    assert code == 0, err[-3000:]
    for job, k in ((0, 1), (1, 2)):
        report = json.loads((tmp_path / "eval" / str(job) / "eval" / "eval.json").read_text())
        assert report["k"] == k and report["metrics"]["prompts"] == 2
    code, err = _app(
        "r1mega.cli.rejection_sample",
        "-m",
        *job_args(data, ckpt),
        "rejection.samples_per_prompt=1,2",
        "rejection.max_prompts=2",
        "rejection.max_new_tokens=4",
        f"hydra.sweep.dir={tmp_path / 'rs'}",
    )
    assert code == 0, err[-3000:]
    for job, n in ((0, 1), (1, 2)):
        summary = json.loads((tmp_path / "rs" / str(job) / "rejection_sampling" / "summary.json").read_text())
        assert (summary["prompts"], summary["samples"]) == (2, 2 * n)


@pytest.mark.slow
def test_a_pipeline_sweep_runs_each_pipeline_in_its_own_run_dir(tmp_path: Path) -> None:
    step = "steps=[{name:hello,kind:command,module:json.tool,overrides:[--help]}]"
    sweep = tmp_path / "sweep"
    code, err = _app("r1mega.cli.pipeline", "-m", "report=false", step, "nproc=1,2", f"hydra.sweep.dir={sweep}")
    assert code == 0, err[-3000:]
    for job in (0, 1):
        manifest = json.loads((sweep / str(job) / "hello" / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["outputs"]["dir"] == str(sweep / str(job) / "hello")
    assert err.count("step 1/1: hello (command)") == 2  # the second job logs too
