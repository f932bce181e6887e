"""Checkpoint checksum cost: CRC-32 of every file (``r1mega.checkpoint.integrity``) against writing the checkpoint.

Builds a Llama-architecture model in one process (gloo), takes one training step so Adam's state exists, and saves
it twice with ``CheckpointManager.save`` (model, optimizer, schedule, RNG, meta.json: what a run writes), timed
whole; the second save is the one compared (the first also starts dist_checkpointing's writer processes).
Then, on the saved folder: the checksums as the save computes them (right after the write, files in the page
cache), the verification resume runs (the same reads, plus the comparison), and, with ``--cold`` (root only),
both again after dropping the page cache, as a resume on a fresh node reads them. For the choice of hash it
also times the checksums in one thread, and SHA-256 and BLAKE2b over the same files.

Reported: checkpoint size, save seconds, checksum seconds and MB/s, and checksums as a share of the save.

Measured (2 CPU cores shared with a test suite, load 5-35, so +-50%; fp32, one process):

    default (189 M parameters, 2.27 GB): save 27.4 s, checksums 1.55 s (1.46 GB/s, 5.7% of the save);
        SHA-256 2.1 s, BLAKE2b 5.1 s; cold page cache: verify 8.2 s, plain read 7.2 s
    --layers 16 (310 M, 3.73 GB): save 14.1-18.8 s, checksums 1.4-1.8 s (2.0-2.6 GB/s, 10-13%);
        SHA-256 2.6-6.3 s, BLAKE2b 4.6-10.8 s; cold: verify 5.8-6.1 s, plain read 2.3-2.7 s

Example::

    python bench/checkpoint_checksums.py                      # hidden 1024, 8 layers: 204 M parameters, ~2.4 GB
    python bench/checkpoint_checksums.py --layers 16 --cold   # ~3.6 GB, also from a cold page cache
    python bench/checkpoint_checksums.py --hidden 64 --layers 1 --ffn 128 --vocab 256   # seconds, a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the default model makes a ~2.4 GB checkpoint."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    p.add_argument("--ffn", type=int, default=4096, help="MLP intermediate size (default 4096)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary (default 32768)")
    p.add_argument("--dir", type=Path, default=None, help="where to save (default: a temporary folder, removed)")
    p.add_argument("--cold", action="store_true", help="also time from a cold page cache (needs root)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    return p.parse_args(argv)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _drop_page_cache() -> bool:
    """Write dirty pages and drop the page cache (root only); False where that is not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def _hashlib_seconds(folder: Path, names: list[str], algorithm: str) -> float:
    def run() -> None:
        for name in names:
            h = hashlib.new(algorithm)
            with open(folder / name, "rb") as f:
                while block := f.read(16 << 20):
                    h.update(block)

    return _timed(run)[0]


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Save one checkpoint under ``root`` and time its checksums; returns the results."""
    from r1mega.checkpoint import integrity
    from r1mega.checkpoint.manager import CheckpointManager
    from r1mega.config.load import compose_config
    from r1mega.data.synthetic import synthetic_microbatches
    from r1mega.models.builder import build_model, transformer_config
    from r1mega.parallel import bootstrap
    from r1mega.train.step import build_trainer, train_step

    cfg = compose_config(
        [
            "model=llama_tiny",
            f"model.hidden_size={args.hidden}",
            f"model.ffn_hidden_size={args.ffn}",
            f"model.num_layers={args.layers}",
            f"model.num_attention_heads={args.heads}",
            f"model.vocab_size={args.vocab}",
            "optim.micro_batch_size=1",
            "optim.global_batch_size=1",
            "data.seq_length=16",
            "parallel.world_size=null",
        ]
    )
    with bootstrap.single_process(cfg):
        config = transformer_config(cfg)
        trainer = build_trainer(cfg, config, build_model(cfg, config), 1)
        train_step(trainer, synthetic_microbatches(1, 16, args.vocab, 0, 0, 1, 0))
        params = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
        manager = CheckpointManager(cfg, str(root))
        first_save_s, _ = _timed(lambda: manager.save(1, trainer, {}))  # starts dist_checkpointing's writers
        save_s, path = _timed(lambda: manager.save(2, trainer, {}))
        meta = json.loads((path / integrity.META).read_text())
        names = list(meta["files"])
        size = sum(entry["bytes"] for entry in meta["files"].values())
        record_s, _ = _timed(lambda: integrity.record(path))
        threads, integrity._THREADS = integrity._THREADS, 1
        serial_s, _ = _timed(lambda: integrity.record(path))
        integrity._THREADS = threads
        verify_s, _ = _timed(lambda: integrity.verify(path, meta["files"]))
        result: dict[str, Any] = {
            "parameters": params,
            "files": len(names),
            "checkpoint_gb": size / 1e9,
            "first_save_s": first_save_s,
            "save_s": save_s,
            "checksum_s": record_s,
            "checksum_mb_s": size / 1e6 / record_s,
            "checksum_share_of_save": record_s / save_s,
            "checksum_one_thread_s": serial_s,
            "verify_warm_s": verify_s,
            "sha256_s": _hashlib_seconds(path, names, "sha256"),
            "blake2b_s": _hashlib_seconds(path, names, "blake2b"),
        }
        if args.cold and _drop_page_cache():
            result["verify_cold_s"], _ = _timed(lambda: integrity.verify(path, meta["files"]))
            _drop_page_cache()
            result["read_cold_s"] = _read_seconds(path, names)
    return result


def _read_seconds(folder: Path, names: list[str]) -> float:
    """Seconds to read the files once without hashing (the floor under any checksum)."""

    def run() -> None:
        buffer = bytearray(16 << 20)
        for name in names:
            with open(folder / name, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass

    return _timed(run)[0]


def report(r: dict[str, Any]) -> str:
    """The results as lines of text."""
    gb = r["checkpoint_gb"]
    lines = [
        f"checkpoint: {r['parameters'] / 1e6:.0f} M parameters, {r['files']} files, {gb:.2f} GB",
        f"save (CheckpointManager.save, checksums included): {r['save_s']:.2f} s "
        f"(the run's first: {r['first_save_s']:.2f} s)",
        f"crc32 checksums (page cache, as at save): {r['checksum_s']:.2f} s = {r['checksum_mb_s']:.0f} MB/s, "
        f"{100 * r['checksum_share_of_save']:.1f}% of the save (one thread: {r['checksum_one_thread_s']:.2f} s)",
        f"verify (warm): {r['verify_warm_s']:.2f} s",
        f"for comparison over the same files: sha256 {r['sha256_s']:.2f} s ({gb * 1e3 / r['sha256_s']:.0f} MB/s), "
        f"blake2b {r['blake2b_s']:.2f} s ({gb * 1e3 / r['blake2b_s']:.0f} MB/s)",
    ]
    if "verify_cold_s" in r:
        lines.append(
            f"cold page cache: verify {r['verify_cold_s']:.2f} s, plain read {r['read_cold_s']:.2f} s "
            f"({gb * 1e3 / r['read_cold_s']:.0f} MB/s)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print (and optionally write) the results."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    root = args.dir or Path(tempfile.mkdtemp(prefix="r1mega-ckpt-bench-"))
    try:
        result = measure(args, root / "checkpoints")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(report(result))
    print("RESULT " + json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
