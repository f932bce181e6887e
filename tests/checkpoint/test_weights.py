"""``checkpoint.load`` refuses in one line what cannot load (r1mega/checkpoint/weights.py): a missing or foreign
folder, damaged files, another model (the tensor and both shapes). One process, the tiny llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from r1mega.checkpoint import integrity
from r1mega.checkpoint.errors import CheckpointError
from r1mega.checkpoint.reward import load_reward_weights
from r1mega.checkpoint.weights import load_weights, save_weights
from r1mega.cli.exits import ExitCode
from r1mega.config.load import compose_config
from r1mega.models.builder import build_model
from r1mega.parallel import bootstrap

BASE = ["parallel.world_size=null", "model=llama_tiny"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny llama's weights with a meta.json that records their checksums, as a training checkpoint's does."""
    folder = tmp_path_factory.mktemp("weights") / "step_00000002"
    with bootstrap.single_process(compose_config(BASE)):
        save_weights(build_model(compose_config(BASE)), str(folder))
        meta = {"config": {"model": {"name": "llama_tiny", "family": "llama"}}, "files": integrity.record(folder)}
        (folder / "meta.json").write_text(json.dumps(meta))
        yield folder


def _load(path: Path | str, *overrides: str, verify: bool = True) -> None:
    load_weights(build_model(compose_config([*BASE, *overrides])), str(path), verify=verify)


def test_the_saved_weights_load(saved: Path) -> None:
    _load(saved)


def test_a_missing_folder_is_one_sentence(saved: Path, tmp_path: Path) -> None:  # saved: the process group
    with pytest.raises(CheckpointError, match=f"^cannot load weights from {tmp_path / 'nope'}: no such folder$"):
        _load(tmp_path / "nope")


def test_a_file_is_no_checkpoint(saved: Path) -> None:
    with pytest.raises(CheckpointError, match="it is a file, not a checkpoint folder"):
        _load(saved / "meta.json")


def test_a_checkpoints_folder_names_its_latest(saved: Path) -> None:
    (saved.parent / "latest").write_text(saved.name)
    with pytest.raises(CheckpointError, match=f"no metadata.json.*give {saved}$"):
        _load(saved.parent)


def test_another_size_names_the_tensor_and_both_shapes(saved: Path) -> None:
    with pytest.raises(CheckpointError) as error:
        _load(saved, "model.hidden_size=128")
    assert str(error.value) == (
        f"{saved} does not fit this model: tensor decoder.layers.0.input_layernorm.weight has shape (64,) in the "
        "checkpoint, (128,) in the model; it was saved with model=llama_tiny (family llama) (check model.*)"
    )


def test_another_family_names_a_missing_tensor(saved: Path) -> None:
    with pytest.raises(CheckpointError) as error:
        _load(saved, "model=dsv3_tiny")
    message = str(error.value)
    assert message.startswith(f"{saved} does not fit this model: it lacks tensor decoder.layers.0.self_attention.")
    assert "saved with model=llama_tiny (family llama): another model family" in message


def test_damaged_weights_are_refused_unless_verify_is_off(saved: Path, tmp_path: Path) -> None:
    shard = next(saved.glob("*.distcp"))
    original = shard.read_bytes()
    try:
        with open(shard, "r+b") as f:
            f.seek(len(original) // 2)
            f.write(bytes(4096))
        with pytest.raises(CheckpointError, match=f"^{shard} does not match its checksum in meta.json"):
            _load(saved)
        with pytest.raises(CheckpointError, match=f"^{shard} does not match its checksum"):
            load_reward_weights(build_model(compose_config(BASE)), str(saved))
        _load(saved, verify=False)  # what the check is for: the damage loads silently
    finally:
        shard.write_bytes(original)


@pytest.mark.slow
def test_r1mega_train_exits_2_in_one_line_for_a_missing_checkpoint_load(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_checkpoint"
    proc = subprocess.run(
        [sys.executable, "-m", "r1mega.cli.train", f"run_dir={tmp_path}", f"checkpoint.load={missing}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == ExitCode.USER_ERROR, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"r1mega: CheckpointError: cannot load weights from {missing}: no such folder\n" in proc.stderr


@pytest.mark.slow
def test_bf16_training_keeps_the_loaded_weights(saved: Path, tmp_path: Path) -> None:
    """A bf16 optimizer keeps fp32 main copies of the weights it was built with (the initialisation): after
    ``checkpoint.load`` they must be refreshed, or the first update writes the initialisation back over the
    loaded model (what made a bf16 GRPO of an imported SmolLM2 collapse to a uniform distribution in one step).
    Loaded weights drawn with std 0.5 against an initialisation of std 0.02, one update at a negligible lr."""
    from ckpt_utils import checkpoint_tensors, run_trainer

    loaded = tmp_path / "wide"
    save_weights(build_model(compose_config([*BASE, "model.init_method_std=0.5"])), str(loaded))
    run = tmp_path / "run"
    proc = run_trainer(
        ["model=llama_tiny", "precision=bf16", f"checkpoint.load={loaded}", "optim.train_steps=1", "optim.lr=1e-9"],
        run,
        "optim.min_lr=1e-9",
        "optim.lr_warmup_steps=0",
        "optim.micro_batch_size=2",
        "optim.global_batch_size=2",
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    after = checkpoint_tensors(run / "checkpoints" / "step_00000001")
    key = next(k for k in after if k.endswith("linear_fc1.weight"))
    assert float(after[key].float().std()) > 0.4, f"{key} has std {float(after[key].float().std()):.3f}, not 0.5"
