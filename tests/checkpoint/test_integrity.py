"""Per-file checksums of a checkpoint folder (r1mega/checkpoint/integrity.py), in one process (no group needed).

The damage cases run against a real checkpoint in test_manager.py; here the table and each verdict.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

import pytest

from r1mega.checkpoint import integrity
from r1mega.checkpoint.errors import CheckpointError
from r1mega.cli.exits import ExitCode, exit_code_for


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A checkpoint-shaped folder: two shards, the metadata files, an RNG file and meta.json."""
    for name, size in [("__0_0.distcp", 50_000), ("__1_0.distcp", 30_000), (".metadata", 700), ("rank_00001.pt", 900)]:
        (tmp_path / name).write_bytes(os.urandom(size))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "common.pt").write_bytes(b"x" * 10)
    (tmp_path / "meta.json").write_text("{}")
    return tmp_path


def test_checksum_is_crc32_of_the_whole_file_in_blocks(tmp_path: Path, monkeypatch) -> None:
    data = os.urandom(100_003)
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setattr(integrity, "_BLOCK", 4096)  # many blocks, the last one partial
    assert integrity.checksum(tmp_path / "f") == (len(data), f"{zlib.crc32(data):08x}")


def test_record_lists_every_file_but_meta_json(folder: Path) -> None:
    table = integrity.record(folder)
    assert list(table) == [".metadata", "__0_0.distcp", "__1_0.distcp", "rank_00001.pt", "sub/common.pt"]
    assert table["__1_0.distcp"]["bytes"] == 30_000
    integrity.verify(folder, json.loads(json.dumps(table)))  # as meta.json stores it: passes


@pytest.mark.parametrize(
    "name, world, rank",
    [("__3_0.distcp", 4, 3), ("__3_1.distcp", 2, 1), ("rank_00005.pt", 4, 1), (".metadata", 4, 0), ("common.pt", 8, 0)],
)
def test_each_file_is_checked_by_its_writer(name: str, world: int, rank: int) -> None:
    assert integrity.owner(name, world) == rank


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _zero_4k(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize(
    "damage, name, says",
    [
        (_flip, "__1_0.distcp", "does not match its checksum in meta.json"),
        (_zero_4k, "__0_0.distcp", "does not match its checksum in meta.json"),
        (_truncate, "rank_00001.pt", "has 450 bytes where meta.json records 900 (truncated)"),
        (Path.unlink, ".metadata", "is missing (meta.json lists it)"),
    ],
    ids=["flipped", "zeroed_4k", "truncated", "missing"],
)
def test_damage_is_named_in_one_line(folder: Path, damage, name: str, says: str) -> None:
    table = integrity.record(folder)
    damage(folder / name)
    with pytest.raises(CheckpointError) as error:
        integrity.verify(folder, table)
    message = str(error.value)
    assert message.startswith(f"{folder / name} ") and says in message and "\n" not in message
    assert exit_code_for(error.value) == ExitCode.USER_ERROR


def test_every_damaged_file_is_counted(folder: Path) -> None:
    table = integrity.record(folder)
    _flip(folder / "__0_0.distcp")
    (folder / "rank_00001.pt").unlink()
    assert [p.split()[0] for p in integrity.problems(folder, table)] == [
        str(folder / "__0_0.distcp"),
        str(folder / "rank_00001.pt"),
    ]
    with pytest.raises(CheckpointError, match=r"\(and 1 more damaged file\)$"):
        integrity.verify(folder, table)


def test_a_checkpoint_without_checksums_loads_with_a_warning(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("r1mega")
    attach = not logger.propagate  # after setup_logging it does not reach caplog's root handler
    if attach:
        logger.addHandler(caplog.handler)
    try:
        integrity.verify(folder, None)
    finally:
        if attach:
            logger.removeHandler(caplog.handler)
    assert "records no per-file checksums" in caplog.text
