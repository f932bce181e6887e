"""The shipped pipeline config composes into typed steps whose hand-offs all refer to earlier steps."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from r1mega.cli.pipeline import register
from r1mega.config.errors import ConfigError
from r1mega.config.load import CONFIG_MODULE, compose_config
from r1mega.pipeline.config import PipelineConfig, StepConfig


def _tiny(*overrides: str) -> PipelineConfig:
    register()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return OmegaConf.to_object(compose("r1_pipeline", list(overrides)))


def test_tiny_pipeline_is_the_r1_recipe_in_order():
    cfg = _tiny()
    names = [s.name for s in cfg.steps]
    for earlier, later in [("base", "cold_start_sft"), ("cold_start_sft", "grpo"), ("grpo", "rejection"),
                           ("reward_model", "preference_rl"), ("teacher_traces", "distill_qwen"),
                           ("distill_llama", "export_llama")]:  # fmt: skip
        assert names.index(earlier) < names.index(later)
    seen: set[str] = set()
    for step in cfg.steps:
        for ref in re.findall(r"\{(\w+)\.\w+\}", " ".join(step.overrides)):
            assert ref in seen, f"{step.name} refers to {ref}, not an earlier step"
        seen.add(step.name)


@pytest.mark.parametrize("pipeline", ["tiny", "smollm2"])
def test_every_train_sample_and_eval_step_composes_as_an_r1mega_config(pipeline: str) -> None:
    for step in _tiny(f"pipeline={pipeline}").steps:
        if step.kind in ("train", "sample", "eval"):
            overrides = [re.sub(r"\{\w+\.\w+\}", "/tmp/x", o) for o in step.overrides]
            compose_config(overrides, config_name=step.config_name or "config")


def test_help():
    out = subprocess.run([sys.executable, "-m", "r1mega.cli.pipeline", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "steps:" in out.stdout and "cold_start_sft" in out.stdout  # Hydra's help shows the composed pipeline


def test_compare_names_two_steps_of_the_pipeline() -> None:
    assert _tiny("pipeline=smollm2").compare == ["base_eval", "grpo"]
    with pytest.raises(ConfigError, match="two step names of this pipeline"):
        PipelineConfig(steps=[StepConfig(name="a")], compare=["a", "b"])
