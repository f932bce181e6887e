"""The generation jobs' shared parts: which folder ``checkpoint.load`` means, a model mismatch caught before
loading, and expert-parallel ranks with uneven prompt shares staying in step (no hang)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from generation_utils import job_args, make_checkpoint, make_prompt_data, run_job

from r1mega.checkpoint.manager import CheckpointError
from r1mega.config.errors import ConfigError
from r1mega.config.load import compose_config
from r1mega.rollout.generation import GenerationJob, check_checkpoint_model, resolve_checkpoint


def _step(root: Path, step: int, model: dict | None = None) -> Path:
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"config": {"model": model or {}}}))
    (path / ".metadata").write_bytes(b"")
    return path


def test_resolve_checkpoint_follows_latest_and_run_folders(tmp_path: Path) -> None:
    ckpts = tmp_path / "run" / "checkpoints"
    _step(ckpts, 2), _step(ckpts, 10)
    assert resolve_checkpoint(str(ckpts)) == ckpts / "step_00000010"  # highest complete step
    (ckpts / "latest").write_text("step_00000002\n")
    assert resolve_checkpoint(str(ckpts)) == ckpts / "step_00000002"  # the pointer wins
    assert resolve_checkpoint(str(tmp_path / "run")) == ckpts / "step_00000002"
    assert resolve_checkpoint(str(ckpts / "step_00000010")) == ckpts / "step_00000010"
    weights = tmp_path / "imported"
    weights.mkdir()
    (weights / ".metadata").write_bytes(b"")
    assert resolve_checkpoint(str(weights)) == weights
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_checkpoint(str(tmp_path / "empty"))


def test_a_checkpoint_of_another_model_names_the_preset(tmp_path: Path) -> None:
    cfg = compose_config(["model=qwen2_tiny"])
    same = _step(tmp_path, 1, {"name": "qwen2_tiny", "family": "qwen2", "num_layers": 2, "hidden_size": 64})
    check_checkpoint_model(same, cfg)
    other = _step(tmp_path, 2, {"name": "dsv3_tiny", "family": "deepseek_v3", "num_layers": 2})
    with pytest.raises(ConfigError, match=r"^model='qwen2_tiny' is invalid: .*family='deepseek_v3'.*model=dsv3_tiny"):
        check_checkpoint_model(other, cfg)


def test_the_checkpoint_is_checked_before_anything_loads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^checkpoint\.load=None is invalid"):
        GenerationJob(compose_config([]), ctx=None)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        GenerationJob(compose_config([f"checkpoint.load={tmp_path}"]), ctx=None)
    with pytest.raises(ConfigError, match=r"^data\.tokenizer=None is invalid"):
        GenerationJob(compose_config([f"checkpoint.load={_step(tmp_path, 1)}"]), ctx=None)


@pytest.mark.slow
def test_expert_parallel_ranks_with_uneven_shares_stay_in_step(tmp_path: Path) -> None:
    """3 prompts, one per batch, over EP=2 ranks: rank 1 runs out after one batch and serves rank 0's MoE
    exchanges with throw-away rows until rank 0 is done; every prompt is evaluated once."""
    data, ckpt = make_prompt_data(tmp_path / "data"), make_checkpoint(tmp_path / "ckpt", "dsv3_tiny")
    args = [*job_args(data, ckpt, "dsv3_tiny"), "parallel=ep2", "eval.max_prompts=3", "eval.batch_size=1",
            "eval.samples=2", "eval.max_new_tokens=8"]  # fmt: skip
    logs = run_job("r1mega.cli.eval", args, tmp_path / "run", ranks=2, timeout=400)
    assert all(log.startswith("[rc=0]") for log in logs), logs[0][-3000:] + logs[1][-3000:]
    report = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert report["metrics"]["prompts"] == 3
    samples = (tmp_path / "run" / "eval" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 6
