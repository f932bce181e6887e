"""A damaged checkpoint is never loaded: resume skips it for the newest intact one (r1mega/checkpoint/manager.py).

One process (gloo), the tiny llama trained one step: checkpoints at step 2 and step 4 (other weights), then bytes
flipped, a file truncated or removed in step 4's model tensors, optimizer tensors or RNG file. Resume must name
the file in one warning and restore step 2 exactly; with two ranks (integrity_worker.py), both pick step 2 when
only one of them checksums the damaged shard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks
from torch.distributed.checkpoint import FileSystemReader

from r1mega.checkpoint import integrity
from r1mega.checkpoint.errors import CheckpointError
from r1mega.checkpoint.manager import CheckpointManager
from r1mega.checkpoint.weights import map_parameters
from r1mega.cli.exits import ExitCode, exit_code_for
from r1mega.config.load import compose_config
from r1mega.config.schema import R1Config
from r1mega.data.synthetic import synthetic_microbatches
from r1mega.models.builder import build_model, transformer_config, unwrap
from r1mega.parallel import bootstrap
from r1mega.train.step import Trainer, build_trainer, train_step

STEP2, STEP4 = "step_00000002", "step_00000004"


@dataclasses.dataclass
class Run:
    cfg: R1Config
    trainer: Trainer
    pristine: Path
    """A checkpoints folder with STEP2 and STEP4 (``latest`` names STEP4); copied before any damage."""
    weights_at_2: dict[str, torch.Tensor]


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for chunk in trainer.model for n, p in unwrap(chunk).named_parameters()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    cfg = compose_config(["parallel.world_size=null", "model=llama_tiny", "data.seq_length=32"])
    pristine = tmp_path_factory.mktemp("pristine")
    with bootstrap.single_process(cfg):
        config = transformer_config(cfg)
        trainer = build_trainer(cfg, config, build_model(cfg, config), 1)
        train_step(trainer, synthetic_microbatches(2, 32, cfg.model.vocab_size, 0, 0, 1, 0))  # Adam state exists
        manager = CheckpointManager(cfg, str(pristine))
        manager.save(2, trainer, {"at": 2})
        weights_at_2 = _weights(trainer)
        map_parameters(trainer.model, lambda name, p: p + 1)
        manager.save(4, trainer, {"at": 4})
        yield Run(cfg, trainer, pristine, weights_at_2)


@pytest.fixture
def ckpt(run: Run, tmp_path: Path) -> Path:
    shutil.copytree(run.pristine, tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[str]]]:
    """The r1mega warnings logged so far (attached to the r1mega logger: it may not propagate to the root)."""
    logger = logging.getLogger("r1mega")
    attach = not logger.propagate
    if attach:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="r1mega")
    yield lambda: [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if attach:
        logger.removeHandler(caplog.handler)


def _largest_entry(checkpoint: Path, optimizer: bool) -> tuple[Path, int, int]:
    """(file, offset, length) of the largest model (or optimizer) tensor stored in the checkpoint."""
    storage = FileSystemReader(str(checkpoint)).read_metadata().storage_data
    entries = [
        (info.length, info.relative_path, info.offset)
        for index, info in storage.items()
        if index.fqn.startswith("optimizer.") == optimizer and "_extra_state" not in index.fqn
    ]
    length, name, offset = max(entries)
    return checkpoint / name, offset, length


def _damage(checkpoint: Path, part: str, how: str) -> Path:
    """Damage the ``part`` (model / optimizer / rng) of a checkpoint ``how``; returns the damaged file."""
    if part == "rng":
        path = checkpoint / "rank_00000.pt"
        offset, length = 0, path.stat().st_size
    else:
        path, offset, length = _largest_entry(checkpoint, optimizer=part == "optimizer")
    middle = offset + length // 2
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        os.truncate(path, middle)
    else:  # flipped: one byte inverted; zeroed: 4 KB (or what the tensor holds) set to zero
        with open(path, "r+b") as f:
            f.seek(middle)
            old = f.read(1 if how == "flipped" else min(4096, length // 2))
            f.seek(middle)
            f.write(bytes([old[0] ^ 0xFF]) if how == "flipped" else bytes(len(old)))
    return path


CASES = [
    ("model", "flipped"),
    ("model", "zeroed"),
    ("model", "truncated"),
    ("model", "missing"),
    ("optimizer", "flipped"),
    ("optimizer", "truncated"),
    ("optimizer", "missing"),
    ("rng", "flipped"),
    ("rng", "truncated"),
    ("rng", "missing"),
]


@pytest.mark.parametrize("part, how", CASES, ids=[f"{p}-{h}" for p, h in CASES])
def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(
    run: Run, ckpt: Path, logged: Callable[[], list[str]], part: str, how: str
) -> None:
    damaged = _damage(ckpt / STEP4, part, how)
    manager = CheckpointManager(run.cfg, str(ckpt))
    with pytest.raises(CheckpointError, match=str(damaged)):  # named explicitly: refused, never loaded
        manager.load(ckpt / STEP4, run.trainer)
    assert manager.latest() == ckpt / STEP2
    warned = logged()
    assert len(warned) == 1 and str(damaged) in warned[0] and STEP4 in warned[0], warned
    assert manager.load(ckpt / STEP2, run.trainer) == (2, {"at": 2})
    got = _weights(run.trainer)
    assert all(torch.equal(got[name], value) for name, value in run.weights_at_2.items())


@pytest.mark.parametrize("name", [".metadata", "meta.json"])
def test_damaged_metadata_is_skipped_too(run: Run, ckpt: Path, name: str) -> None:
    path = ckpt / STEP4 / name
    os.truncate(path, path.stat().st_size // 2)
    assert CheckpointManager(run.cfg, str(ckpt)).latest() == ckpt / STEP2


def test_no_intact_checkpoint_exits_2_naming_the_file(run: Run, ckpt: Path) -> None:
    newest = _damage(ckpt / STEP4, "model", "flipped")
    _damage(ckpt / STEP2, "rng", "missing")
    with pytest.raises(CheckpointError) as error:
        CheckpointManager(run.cfg, str(ckpt)).latest()
    message = str(error.value)
    assert message.startswith(f"no intact checkpoint to resume from in {ckpt}: {newest} does not match")
    assert "(the older one is damaged too)" in message and "\n" not in message
    assert exit_code_for(error.value) == ExitCode.USER_ERROR


def test_save_records_every_file(run: Run) -> None:
    checkpoint = run.pristine / STEP4
    files = json.loads((checkpoint / "meta.json").read_text())["files"]
    assert list(files) == integrity.list_files(checkpoint)
    assert {".metadata", "common.pt", "metadata.json", "rank_00000.pt"} < set(files)
    assert any(name.endswith(".distcp") for name in files)


def test_a_checkpoint_without_checksums_resumes_with_a_warning(
    run: Run, ckpt: Path, logged: Callable[[], list[str]]
) -> None:
    meta_file = ckpt / STEP4 / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["files"]  # as r1mega wrote them before per-file checksums
    meta_file.write_text(json.dumps(meta))
    assert CheckpointManager(run.cfg, str(ckpt)).latest() == ckpt / STEP4
    assert "records no per-file checksums" in " ".join(logged())


def test_verify_false_loads_what_the_check_refuses(run: Run, ckpt: Path) -> None:
    """The issue's case, with the check off: 4 KB zeroed in a shard loads silently into the weights."""
    _damage(ckpt / STEP4, "model", "zeroed")
    cfg = dataclasses.replace(run.cfg, checkpoint=dataclasses.replace(run.cfg.checkpoint, verify=False))
    manager = CheckpointManager(cfg, str(ckpt))
    assert manager.latest() == ckpt / STEP4
    manager.load(ckpt / STEP4, run.trainer)
    got = _weights(run.trainer)
    assert not all(torch.equal(got[name], value + 1) for name, value in run.weights_at_2.items())


@pytest.mark.slow
def test_ranks_agree_on_the_checkpoint_when_one_finds_the_damage(tmp_path: Path) -> None:
    worker = str(Path(__file__).with_name("integrity_worker.py"))
    outputs = run_ranks(worker, [str(tmp_path)], world_size=2)
    for rank, output in enumerate(outputs):
        assert f"rank {rank} resumed {STEP2} at step 2" in output, output[-3000:]
    assert "__1_0.distcp does not match its checksum" in outputs[0]  # rank 0 logs what rank 1 found
