"""The pipeline runner: steps run in order with manifests, later steps read earlier outputs, a re-run skips
completed steps, and a pipeline killed mid-stage resumes that stage from its checkpoint to completion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from generation_utils import make_prompt_data, sft_args

from r1mega.config.errors import ConfigError
from r1mega.pipeline.config import PipelineConfig, StepConfig
from r1mega.pipeline.runner import PipelineError, PipelineRunner, read_manifest

TRAIN = ["optim.lr_warmup_steps=0", "data.seq_length=32", "logging.progress_bar=false", "checkpoint.save_interval=1"]


def _pipeline(root: Path) -> PipelineConfig:
    marker = root / "marker.txt"
    return PipelineConfig(
        run_dir=str(root / "run"),
        report=False,
        steps=[
            StepConfig(name="prepare", kind="command", module="tests_pipeline_marker.py", overrides=[str(marker)]),
            StepConfig(
                name="base", kind="train", overrides=["model=qwen2_tiny", "optim.train_steps=2", *TRAIN], evaluate=False
            ),
            StepConfig(
                name="tune",
                kind="train",
                overrides=["model=qwen2_tiny", "optim.train_steps=3", "checkpoint.load={base.checkpoint}", *TRAIN],
                evaluate=False,
            ),
        ],
    )


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    script = tmp_path / "tests_pipeline_marker.py"
    script.write_text(
        "import sys, pathlib\np = pathlib.Path(sys.argv[1])\np.write_text(p.read_text() + 'x' if p.exists() else 'x')\n"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_steps_chain_skip_and_resume_after_a_kill(workdir):
    cfg = _pipeline(workdir)
    env_kill = {"R1MEGA_KILL_AT": "train_step:2"}
    import os

    killed = PipelineRunner(cfg, env={**os.environ, **env_kill})
    with pytest.raises(PipelineError, match="base"):  # SIGKILLed after step 2 of the first training step
        killed.run()
    base = read_manifest(workdir / "run" / "base")
    assert base["status"] == "running"
    manifests = PipelineRunner(cfg).run()
    assert [m["status"] for m in manifests] == ["complete"] * 3
    assert (workdir / "marker.txt").read_text() == "x"  # the command step ran once
    assert manifests[1]["restarts"] == 1
    assert manifests[1]["outputs"]["checkpoint"].endswith("step_00000002")
    tune_log = (workdir / "run" / "tune" / "step.log").read_text()
    assert f"checkpoint.load={manifests[1]['outputs']['checkpoint']}" in tune_log
    assert manifests[2]["outputs"]["checkpoint"].endswith("step_00000003")
    again = PipelineRunner(cfg).run()  # everything complete: nothing runs
    assert [m["started"] for m in again] == [m["started"] for m in manifests]
    assert json.loads((workdir / "run" / "tune" / "manifest.json").read_text())["status"] == "complete"


def test_unknown_reference_names_the_step(workdir):
    cfg = PipelineConfig(
        run_dir=str(workdir / "run"),
        steps=[StepConfig(name="a", kind="train", overrides=["checkpoint.load={nothing.checkpoint}"])],
    )
    with pytest.raises(PipelineError, match=r"step 'a' refers to \{nothing.checkpoint\}"):
        PipelineRunner(cfg).run()


def test_training_step_evaluates_its_final_checkpoint_in_the_same_process(workdir):
    data = make_prompt_data(workdir / "data")
    sft = ["model=qwen2_tiny", *sft_args(data, None, 1, 1), "optim.train_steps=2", TRAIN[3]]
    cfg = PipelineConfig(
        run_dir=str(workdir / "run"),
        report=False,
        eval_prompts=str(data / "eval_prompts.jsonl"),
        eval_overrides=["eval.samples=2", "eval.max_prompts=3", "eval.max_new_tokens=8"],
        steps=[StepConfig(name="sft", kind="train", overrides=sft)],
    )
    [manifest] = PipelineRunner(cfg).run()
    report = json.loads((workdir / "run" / "sft" / "eval" / "eval.json").read_text())
    assert report["checkpoint"].endswith("step_00000002") and report["k"] == 2
    assert report["metrics"]["prompts"] == 3 and manifest["metrics"] == report["metrics"]
    assert (workdir / "run" / "sft" / "step.log").read_text().count("\n$ ") == 1  # no second process
    with pytest.raises(ConfigError, match="eval.\\* overrides only"):
        PipelineConfig(eval_overrides=["model=qwen2_tiny"])


def test_data_steps_run_from_a_directory_outside_the_repo(workdir):
    """What the pipeline runs ships inside the package (``python -m r1mega.cli.make_*``): no path into the repo."""
    assert not (workdir / "tools").exists()  # the working directory is a bare temporary folder
    cfg = PipelineConfig(
        run_dir=str(workdir / "run"),
        report=False,
        steps=[
            StepConfig(name="data", kind="command", module="r1mega.cli.make_cold_start",
                       overrides=["--num-train", "30", "--num-eval", "6", "--preset", "easy", "--out", "data/cs"]),
            StepConfig(name="preferences", kind="command", module="r1mega.cli.make_preferences",
                       overrides=["--cold-start", "data/cs", "--out", "data/prefs", "--num-train", "20",
                                  "--num-eval", "6"]),
        ],
    )  # fmt: skip
    manifests = PipelineRunner(cfg).run()
    assert [m["status"] for m in manifests] == ["complete", "complete"]
    assert (workdir / "data" / "cs" / "train.jsonl").is_file() and (
        workdir / "data" / "prefs" / "train.jsonl"
    ).is_file()


def test_the_tiny_pipeline_names_modules_not_repo_paths():
    import importlib.util

    from omegaconf import OmegaConf

    tiny = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "pipeline" / "tiny.yaml")
    commands = [s for s in tiny.steps if s.kind == "command"]
    assert commands and all(importlib.util.find_spec(s.module) is not None for s in commands)


def test_a_step_that_refused_its_input_says_a_rerun_will_not_fix_it(workdir, capsys):
    from r1mega.cli.exits import INPUT_HINT, fail

    cfg = PipelineConfig(
        run_dir=str(workdir / "run"),
        report=False,
        steps=[StepConfig(name="bad", kind="train", overrides=["optim.lr=-1"], evaluate=False)],
    )
    with pytest.raises(PipelineError) as error:
        PipelineRunner(cfg).run()
    assert error.value.step_exit_code == 2
    with pytest.raises(SystemExit):
        fail(error.value, "r1mega-pipeline")
    assert INPUT_HINT in capsys.readouterr().err
