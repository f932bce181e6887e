"""Training checkpoints that survive anything: atomic, resumable, reshardable.

On disk::

    <dir>/step_00000040/     a complete checkpoint: megatron-core dist_checkpointing files (model,
                             optimizer, scheduler), rank_00000.pt... (per-rank RNG states) and meta.json
    <dir>/latest             the name of the newest complete checkpoint, replaced atomically
    <dir>/.tmp_step_00000050 a checkpoint being written; never loaded, removed at the next start

Every rank writes into the temporary folder; after a barrier the ranks checksum the files
(``r1mega.checkpoint.integrity``: size and CRC-32 of every file, each rank its own shards), rank 0 writes
``meta.json`` with them, renames the folder to its final name (atomic on POSIX) and then replaces
``latest``. A kill at any moment leaves the previous complete checkpoint as the newest one.
Loading trusts only folders with a valid ``meta.json`` whose checksums match (``checkpoint.verify``): a
damaged newest checkpoint is skipped with one warning naming the file, and the run resumes from the newest
intact one. It uses ``weights_only`` unpickling for r1mega's own files, and reshards across TP/PP/EP layouts
through dist_checkpointing.

The optimizer state reshards too (``r1mega.checkpoint.optimizer_state``), including between EP=1 and
EP>1, and the distributed optimizer (ZeRO-1) resumes bit-identically. Its ``fully_reshardable`` format
loads into any layout; ``dp_reshardable`` / ``dp_zero_gather_scatter`` store the state in gradient-buffer
order and load only into the layout they were saved from (``check_optimizer_layout`` refuses others with
a message before anything is read).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

from r1mega.checkpoint import integrity, optimizer_state
from r1mega.checkpoint.errors import CheckpointError  # raised here, imported from here by callers
from r1mega.checkpoint.weights import check_shapes, sharded_model_state, sharding_metadata
from r1mega.config.schema import R1Config
from r1mega.config.validate import detect_accelerator, moe_experts
from r1mega.models.builder import unwrap
from r1mega.train.step import Trainer
from r1mega.utils.faults import kill_point
from r1mega.utils.logging import get_logger

log = get_logger(__name__)

FORMAT = "r1mega-ckpt/1"
_PICKLED = (".metadata", "common.pt")
"""Files dist_checkpointing reads with pickle; their checksums are recorded in meta.json."""


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """This rank's random states, as tensors and plain numbers (loadable with ``weights_only``)."""
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    py = state["python"]
    random.setstate((3, tuple(int(x) for x in py[:-1]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


class CheckpointManager:
    """Saves and finds complete checkpoints in one folder; every method is collective unless noted."""

    def __init__(self, cfg: R1Config, directory: str | None = None) -> None:
        self.cfg = cfg
        self.dir = Path(directory or cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints"))
        self.keep_last = cfg.checkpoint.keep_last
        self.rank = dist.get_rank()
        self._verified: set[Path] = set()
        """Checkpoints this manager saved or verified: not checked again (the run's last save, resume then load)."""
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for leftover in self.dir.glob(".tmp_step_*"):  # half-written by a killed run
                log.warning("removing incomplete checkpoint %s", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        dist.barrier()

    # ---------------------------------------------------------------- finding
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (local: no collective)."""
        found = [p for p in self.dir.glob("step_*") if (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def _candidates(self) -> list[Path]:
        """Complete checkpoints, newest first, the one ``latest`` names at the front (local)."""
        done = self.complete()[::-1]
        pointer = self.dir / "latest"
        if pointer.is_file():
            named = self.dir / pointer.read_text().strip()
            if named in done:
                done.remove(named)
                done.insert(0, named)
        return done

    def latest(self) -> Path | None:
        """The newest complete checkpoint that passes ``verify`` (collective): ``latest`` if it names one, else
        the highest step; None when there is none.

        A damaged one is skipped with one warning naming the file and the next older one is tried; when every
        one is damaged, raises ``CheckpointError`` naming the newest's file. Rank 0's listing is used on every
        rank, and ``verify`` gives every rank the same verdict, so all ranks pick the same checkpoint.
        """
        names = integrity.from_rank0([p.name for p in self._candidates()] if self.rank == 0 else [])
        damaged: list[str] = []
        for path in (self.dir / name for name in names):
            try:
                self.verify(path)
                return path
            except CheckpointError as e:
                damaged.append(str(e))
                if self.rank == 0:
                    log.warning("damaged checkpoint, not resuming from it: %s", e)
        if damaged:
            n = len(damaged) - 1
            older = (
                f" (the {n} older ones are damaged too)" if n > 1 else " (the older one is damaged too)" if n else ""
            )
            raise CheckpointError(
                f"no intact checkpoint to resume from in {self.dir}: {damaged[0]}{older}. Restore the file, move "
                "the damaged checkpoints away, or start over with checkpoint.resume=false"
            )
        return None

    # ---------------------------------------------------------------- saving
    def _state(self, trainer: Trainer, loading: bool, optimizer_metadata: dict[str, Any]) -> dict[str, Any]:
        model = {"model": sharded_model_state(trainer.model)}
        metadata = {**sharding_metadata(trainer.model), **optimizer_metadata}
        optimizer = trainer.optimizer.sharded_state_dict(model, is_loading=loading, metadata=metadata)
        if not loading:
            optimizer_state.zero_padding(optimizer)
        return {**model, "optimizer": optimizer, "scheduler": trainer.scheduler.state_dict()}

    def save(self, step: int, trainer: Trainer, stage_state: dict[str, Any]) -> Path:
        """Write a complete checkpoint for ``step`` and publish it atomically; prune old ones."""
        final = self.dir / _step_name(step)
        tmp = self.dir / f".tmp_{_step_name(step)}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        optimizer_metadata = optimizer_state.save_metadata(self.cfg)
        dist_checkpointing.save(self._state(trainer, False, optimizer_metadata), str(tmp))
        torch.save(rng_state(), tmp / f"rank_{self.rank:05d}.pt")
        kill_point("checkpoint_write", step)
        dist.barrier()
        start = time.perf_counter()
        files = integrity.record(tmp)  # collective: each rank its own files
        hashed = time.perf_counter() - start
        if self.rank == 0:
            meta = {
                "format": FORMAT,
                "step": step,
                "world_size": dist.get_world_size(),
                "stage_state": stage_state,
                "config": asdict(self.cfg),
                "moe_experts": self._experts(),
                "optimizer_metadata": optimizer_metadata,
                "adam_step": optimizer_state.adam_step(trainer.optimizer),
                "sha256": {name: _sha256(tmp / name) for name in _PICKLED if (tmp / name).exists()},
                "files": files,
            }
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f, indent=1, default=str)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # a step saved twice (e.g. preemption right after an interval save)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.dir)
            pointer_tmp = self.dir / ".latest.tmp"
            pointer_tmp.write_text(final.name)
            os.replace(pointer_tmp, self.dir / "latest")
            _fsync_dir(self.dir)
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        self._verified.add(final)
        size = sum(entry["bytes"] for entry in files.values()) / 1e9
        log.info("saved checkpoint %s (%d files, %.2f GB; checksums %.2f s)", final, len(files), size, hashed)
        return final

    # ---------------------------------------------------------------- loading
    def read_meta(self, path: Path) -> dict[str, Any]:
        """``meta.json`` of a checkpoint, verified against the pickled files it vouches for (local)."""
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: meta.json is missing or unreadable ({e}); not an r1mega checkpoint") from e
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        for name, digest in meta.get("sha256", {}).items():
            if not (path / name).is_file() or _sha256(path / name) != digest:
                raise CheckpointError(
                    f"{path}: {name} does not match the checksum in meta.json; refusing to unpickle it"
                )
        return meta

    def _experts(self) -> str | None:
        """How this run's routed experts run ("grouped", "sequential"; None when dense): their parameters are one
        tensor per expert or two stacked tensors per layer, so gradient buffers differ between the two."""
        return moe_experts(self.cfg, detect_accelerator())

    def check_optimizer_layout(self, path: Path, meta: dict[str, Any]) -> None:
        """Check this run's optimizer can load the optimizer state of ``path`` (local).

        Raises ``CheckpointError`` (on every rank, before any collective) when the optimizer kinds differ
        (distributed or not) or a layout-bound distributed-optimizer format meets another layout.
        """
        saved = meta["config"]
        saved_format = saved["checkpoint"]["optimizer_format"]
        saved_distributed = saved["parallel"]["use_distributed_optimizer"]
        weights_only = f"(checkpoint.load={path} checkpoint.resume=false starts from its weights alone)"
        if saved_distributed != self.cfg.parallel.use_distributed_optimizer:
            setting = f"parallel.use_distributed_optimizer={str(saved_distributed).lower()}"
            raise CheckpointError(
                f"{path} was saved with {setting}; its optimizer state loads only with the same setting: "
                f"resume with {setting} {weights_only}"
            )
        if saved_distributed and saved_format in optimizer_state.LAYOUT_BOUND_FORMATS:
            # Checkpoints from before meta.json recorded it ran SequentialMLP (the local spec had nothing else).
            saved_experts = meta.get("moe_experts", "sequential" if saved["model"]["num_experts"] else None)
            then = {**optimizer_state.optimizer_layout(saved), "experts": saved_experts}
            now = {**optimizer_state.optimizer_layout(asdict(self.cfg)), "experts": self._experts()}
            if then != now:
                differ = ", ".join(f"{key} {then[key]} -> {now[key]}" for key in then if then[key] != now[key])
                raise CheckpointError(
                    f"{path} holds distributed-optimizer state in checkpoint.optimizer_format={saved_format}, "
                    f"which loads only into the layout it was saved with ({differ}; the DP size may differ). "
                    "Resume in the saved layout; to change layouts, resume there once with "
                    "checkpoint.optimizer_format=fully_reshardable, whose checkpoints load into any layout "
                    f"{weights_only}"
                )

    def verify(self, path: Path) -> dict[str, Any]:
        """``meta.json`` of ``path`` once it is trusted (collective; raises ``CheckpointError`` on every rank).

        ``read_meta`` on every rank, then, with ``checkpoint.verify``, the size and CRC-32 of every file it lists
        (``integrity.verify``: each rank its share; a checkpoint without the list loads with a warning).
        """
        meta: dict[str, Any] = {}
        try:
            meta, problem = self.read_meta(path), None
        except CheckpointError as e:
            problem = str(e)
        problem = integrity.first(problem)  # every rank raises, or none
        if problem is not None:
            raise CheckpointError(problem)
        if self.cfg.checkpoint.verify and path not in self._verified:
            integrity.verify(path, meta.get("files"))
            self._verified.add(path)
        return meta

    def load(self, path: Path, trainer: Trainer) -> tuple[int, dict[str, Any]]:
        """Restore model, optimizer, scheduler and (same world size) RNG; returns (step, stage state).

        Nothing is read before ``verify`` passes (the files) and ``check_shapes`` (this model's tensors).
        """
        meta = self.verify(path)
        self.check_optimizer_layout(path, meta)
        optimizer_state.init_optimizer_state(trainer.optimizer)
        # Checkpoints from before meta.json recorded these options were saved with the format alone.
        optimizer_metadata = meta.get("optimizer_metadata") or {
            "distrib_optim_sharding_type": meta["config"]["checkpoint"]["optimizer_format"]
        }
        check_shapes(sharded_model_state(trainer.model), str(path))
        state = self._state(trainer, True, optimizer_metadata)
        skeleton = optimizer_state.skeleton(state["optimizer"])
        loaded = dist_checkpointing.load(state, str(path))
        for i, chunk in enumerate(trainer.model):
            unwrap(chunk).load_state_dict(loaded["model"][f"model{i}"])
        regrouped = optimizer_state.regroup(skeleton, loaded["optimizer"], meta.get("adam_step"))
        optimizer_state.load_optimizer_state(trainer.optimizer, loaded["optimizer"] if regrouped is None else regrouped)
        trainer.scheduler.load_state_dict(loaded["scheduler"])
        rng_file = path / f"rank_{self.rank:05d}.pt"
        if meta["world_size"] == dist.get_world_size() and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            log.warning("%s was saved by %d ranks: RNG states not restored", path, meta["world_size"])
        log.info("resumed from %s (step %d)", path, meta["step"])
        return int(meta["step"]), meta.get("stage_state", {})
