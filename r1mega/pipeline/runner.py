"""Runs the pipeline's steps in order, each as its own r1mega process, with a manifest per step.

Every step writes to ``<run_dir>/<name>/`` and records ``manifest.json`` there: the command, the resolved
overrides, input and output paths, metrics, status and timing (written atomically). A re-run skips steps
whose manifest says ``complete`` and whose outputs still exist, and re-runs the interrupted one: training
steps resume from their own newest checkpoint (their run folder is stable), the other kinds are idempotent.

Steps run as subprocesses (``torchrun`` when ``nproc > 1``): megatron-core keeps global state per
process, and a fresh process per stage is also what a cluster scheduler would run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from r1mega.pipeline.config import PipelineConfig, StepConfig
from r1mega.utils.logging import get_logger

log = get_logger(__name__)

MODULES = {
    "train": "r1mega.cli.train",
    "sample": "r1mega.cli.rejection_sample",
    "eval": "r1mega.cli.eval",
    "export": "r1mega.cli.convert",
    "hf_check": "r1mega.pipeline.hf_check",
}
"""The python module behind each step kind (``command`` steps name their own)."""

_REFERENCE = re.compile(r"\{(\w+)\.(\w+)\}")


class PipelineError(RuntimeError):
    """A step failed or refers to something that does not exist; the message says which and where to look."""

    def __init__(self, message: str, step_exit_code: int | None = None) -> None:
        super().__init__(message)
        self.step_exit_code = step_exit_code
        """The failed step's exit status (2: it refused its input, which a re-run alone cannot fix)."""


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file renamed over it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_manifest(step_dir: Path) -> dict[str, Any] | None:
    """A step's manifest, or None if it has none (or an unreadable one: the step runs again)."""
    try:
        return json.loads((step_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a training run folder."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    path = run_dir / "checkpoints" / latest.read_text().strip()
    return path if (path / "meta.json").is_file() else None


class PipelineRunner:
    """Runs ``cfg.steps`` in order under ``cfg.run_dir``."""

    def __init__(self, cfg: PipelineConfig, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.root = Path(cfg.run_dir)
        self.env = dict(os.environ if env is None else env)
        self.outputs: dict[str, dict[str, str]] = {}

    # ---- commands ---------------------------------------------------------------------------------------

    def _resolve(self, text: str, step: StepConfig) -> str:
        def sub(match: re.Match) -> str:
            name, key = match.groups()
            if name not in self.outputs or key not in self.outputs[name]:
                known = {n: sorted(o) for n, o in self.outputs.items()}
                raise PipelineError(
                    f"step {step.name!r} refers to {{{name}.{key}}}, which no earlier step produced: {known}"
                )
            return self.outputs[name][key]

        return _REFERENCE.sub(sub, text)

    def _launcher(self, module: str, processes: int) -> list[str]:
        if module.endswith(".py"):  # a script (tools/*.py), always one process
            return [sys.executable, module]
        if processes > 1:
            return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}", "-m", module]
        return [sys.executable, "-m", module]

    def command(self, step: StepConfig, out: Path) -> tuple[list[str], dict[str, str]]:
        """The command line of ``step`` writing to ``out``, and the outputs it will produce."""
        args = [self._resolve(a, step) for a in step.overrides]
        if step.kind == "command":
            return [*self._launcher(step.module or "", 1), *args], {"dir": str(out)}
        if step.kind == "export":
            hf = out / "hf"
            return [*self._launcher(MODULES["export"], 1), "export", *args, "--out", str(hf)], {"hf": str(hf)}
        head = self._launcher(MODULES[step.kind], self.cfg.nproc)
        if step.config_name:
            head += ["--config-name", step.config_name]
        if step.kind == "train":
            if not step.evaluate:
                return [*head, *args, f"run_dir={out}"], {"run_dir": str(out)}
            evaluation = ["eval.after_training=true", f"eval.output_dir={out / 'eval'}", *self._eval_args(step)]
            return [*head, *args, *evaluation, f"run_dir={out}"], {"run_dir": str(out), "eval": str(out / "eval")}
        if step.kind == "sample":
            return [*head, *args, f"rejection.output_dir={out}", f"run_dir={out}"], {"data": str(out / "train.jsonl")}
        return [*head, *self._eval_args(step), *args, f"eval.output_dir={out}", f"run_dir={out}"], {"eval": str(out)}

    def _eval_args(self, step: StepConfig) -> list[str]:
        prompts = [f"eval.prompts_path={self.cfg.eval_prompts}"] if self.cfg.eval_prompts else []
        return [*prompts, *self.cfg.eval_overrides, *step.eval_overrides]

    # ---- running ---------------------------------------------------------------------------------------

    def _run(self, cmd: list[str], log_path: Path) -> None:
        log.info("$ %s", " ".join(cmd))
        with open(log_path, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env)
        if code != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
            raise PipelineError(f"{cmd[2] if len(cmd) > 2 else cmd} exited with {code}; see {log_path}\n{tail}", code)

    def _outputs_exist(self, manifest: dict[str, Any]) -> bool:
        return all(Path(p).exists() for p in manifest.get("outputs", {}).values())

    def run_step(self, step: StepConfig) -> dict[str, Any]:
        """Run one step (or skip it when complete); returns its manifest."""
        out = self.root / step.name
        out.mkdir(parents=True, exist_ok=True)
        done = read_manifest(out)
        if done and done.get("status") == "complete" and self._outputs_exist(done):
            log.info("step %s: complete, skipped", step.name)
            return done
        cmd, outputs = self.command(step, out)
        manifest: dict[str, Any] = {
            "name": step.name,
            "label": step.label or step.name,
            "kind": step.kind,
            "command": cmd,
            "status": "running",
            "started": time.time(),
            "restarts": (done or {}).get("restarts", -1) + 1,
        }
        write_json(out / "manifest.json", manifest)
        start = time.perf_counter()
        self._run(cmd, out / "step.log")
        if step.kind == "train":
            ckpt = latest_checkpoint(out)
            if ckpt is None:
                raise PipelineError(f"step {step.name} finished without a checkpoint in {out / 'checkpoints'}")
            outputs["checkpoint"] = str(ckpt)
            if step.evaluate and not (out / "eval" / "eval.json").is_file():
                raise PipelineError(f"step {step.name} finished without its evaluation in {out / 'eval'}")
        if step.kind == "export" and step.check_prompts:
            generations = out / "generations.json"
            check = [*self._launcher(MODULES["hf_check"], 1), outputs["hf"], "--prompts", step.check_prompts]
            if "--ckpt" in cmd[:-1]:  # the exported checkpoint, as the export command resolved it
                check += ["--ckpt", cmd[cmd.index("--ckpt") + 1]]
            check += [a for o in step.check_overrides for a in ("--override", o)]
            check += ["--num", str(step.check_num), "--max-new-tokens", str(step.check_max_new_tokens)]
            self._run([*check, "--out", str(generations)], out / "step.log")
            outputs["generations"] = str(generations)
        manifest.update(outputs=outputs, status="complete", seconds=time.perf_counter() - start, finished=time.time())
        manifest["metrics"] = self._metrics(outputs)
        write_json(out / "manifest.json", manifest)
        return manifest

    @staticmethod
    def _metrics(outputs: dict[str, str]) -> dict[str, Any]:
        path = Path(outputs.get("eval", "")) / "eval.json"
        if outputs.get("eval") and path.is_file():
            return json.loads(path.read_text()).get("metrics", {})
        return {}

    def run(self) -> list[dict[str, Any]]:
        """Every step in order; returns their manifests."""
        self.root.mkdir(parents=True, exist_ok=True)
        manifests = []
        for i, step in enumerate(self.cfg.steps, 1):
            log.info("step %d/%d: %s (%s)", i, len(self.cfg.steps), step.name, step.kind)
            manifest = self.run_step(step)
            self.outputs[step.name] = manifest.get("outputs", {})
            manifests.append(manifest)
        return manifests
