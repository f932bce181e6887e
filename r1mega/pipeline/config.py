"""Typed config of ``r1mega-pipeline``: the stages of the R1 recipe in order, each one r1mega command.

A step's overrides may name an earlier step's outputs as ``{step.key}`` (``{sft.checkpoint}``,
``{rejection.data}``, ``{export_qwen.hf}``): the runner substitutes them from that step's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from r1mega.config.errors import ConfigError

STEP_KINDS = ("train", "sample", "eval", "export", "command")
"""train: r1mega-train (checkpoint out); sample: rejection sampling / teacher traces (data out); eval:
r1mega-eval; export: r1mega-convert export (HF folder out); command: a python module with arguments."""


@dataclass
class StepConfig:
    """One step of the pipeline."""

    name: str = "step"
    """Folder name under the pipeline's run_dir, and how later steps refer to this one."""
    kind: str = "train"
    """train, sample, eval, export or command (see STEP_KINDS)."""
    config_name: str | None = None
    """``--config-name`` of the train/sample/eval app (a top-level config under conf/), if not the default."""
    overrides: list[str] = field(default_factory=list)
    """Hydra overrides (train/sample/eval) or arguments (export/command); ``{step.key}`` names earlier outputs."""
    module: str | None = None
    """For kind=command: a python module run with ``python -m`` (``r1mega.cli.make_cold_start``: what the pipeline
    runs ships inside the package, so it works from any directory), or a script path ending in .py."""
    evaluate: bool = True
    """For kind=train: evaluate the final checkpoint on the held-out prompts (the report's table)."""
    eval_overrides: list[str] = field(default_factory=list)
    """``eval.*`` overrides for this step's evaluation, after the pipeline's."""
    label: str = ""
    """What the report calls this step (default: its name)."""
    check_prompts: str | None = None
    """For kind=export: a JSONL of held-out prompts; after the export, ``transformers`` alone loads the folder
    and generates from the first few (``generations.json``, in the report): the proof the folder is usable. The
    exported checkpoint generates from the same prompts in r1mega too, and the tokens must be equal."""
    check_num: int = 4
    """For kind=export: how many of ``check_prompts`` the check generates from."""
    check_max_new_tokens: int = 96
    """For kind=export: the check's greedy generation length."""
    check_overrides: list[str] = field(default_factory=list)
    """For kind=export: training-config overrides that set how the check renders its prompts, as training did
    (``grpo=r1_chat``: its system turn and forced prefix)."""

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise ConfigError(f"pipeline.steps[{self.name}].kind", self.kind, f"one of {', '.join(STEP_KINDS)}")
        if self.kind == "command" and not self.module:
            raise ConfigError(f"pipeline.steps[{self.name}].module", None, "a python module for kind=command")


@dataclass
class PipelineConfig:
    """The whole pipeline run."""

    run_dir: str = "runs/pipeline"
    """Every step writes to ``<run_dir>/<step name>``; the report goes to ``<run_dir>/report``."""
    nproc: int = 1
    """Processes per step (torchrun); 1 runs each step as one plain process."""
    eval_prompts: str | None = None
    """Held-out prompt JSONL the final checkpoint of every training step is evaluated on (R1's protocol, in
    the training step's own processes: ``eval.after_training``); also ``eval.prompts_path`` of eval steps."""
    eval_overrides: list[str] = field(default_factory=list)
    """``eval.*`` overrides every evaluation gets (samples per prompt, prompts, length limit)."""
    steps: list[StepConfig] = field(default_factory=list)
    """The stages, in order."""
    report: bool = True
    """Write the Markdown report with PNG curves at the end."""
    compare: list[str] = field(default_factory=list)
    """Two evaluated steps, before and after (``[base_eval, grpo]``): the report adds their paired difference of
    per-prompt pass@1 with a bootstrap 95% interval (``r1mega.eval.compare``)."""

    def __post_init__(self) -> None:
        for o in self.eval_overrides + [o for s in self.steps for o in s.eval_overrides]:
            if not o.startswith("eval."):
                raise ConfigError("pipeline.eval_overrides", o, "eval.* overrides only (the step's own model and data)")
        names = [s.name for s in self.steps]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError("pipeline.steps", duplicates, "unique step names")
        unknown = [c for c in self.compare if c not in names]
        if self.compare and (len(self.compare) != 2 or unknown):
            raise ConfigError("compare", self.compare, f"two step names of this pipeline ({', '.join(names)})")
        if self.nproc < 1:
            raise ConfigError("nproc", self.nproc, "1 or more")
