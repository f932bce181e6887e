"""A non-editable install carries everything the console scripts run: configs, the pipeline file, the data tools."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_built_wheel_runs_the_pipeline_config_and_data_step_outside_the_repo(tmp_path: Path) -> None:
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "-w", str(wheels), str(REPO)]
    if subprocess.run([*build, "--no-build-isolation"], timeout=300, capture_output=True).returncode != 0:
        subprocess.run(build, check=True, timeout=600, capture_output=True)  # setuptools from the package index
    (wheel,) = wheels.glob("r1mega-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300,
                   capture_output=True)  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(site))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)

    where = run("-c", "import r1mega; print(r1mega.__file__)")
    assert where.stdout.strip().startswith(str(site)), where  # the wheel's copy, not the checkout's
    assert (site / "r1mega" / "conf" / "pipeline" / "tiny.yaml").is_file()
    job = run("-m", "r1mega.cli.pipeline", "pipeline=tiny", "--cfg", "job")
    assert job.returncode == 0 and "make_cold_start" in job.stdout, job.stderr[-2000:]
    data = run("-m", "r1mega.cli.make_cold_start", "--num-train", "20", "--num-eval", "4", "--preset", "easy",
               "--out", "data/cs")  # fmt: skip
    assert data.returncode == 0, data.stderr[-2000:]
    assert (work / "data" / "cs" / "train.jsonl").is_file() and not (work / "tools").exists()
