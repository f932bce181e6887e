"""Training checkpoints that survive anything: atomic, resumable, reshardable.

On disk::

    <dir>/step_00000040/     a complete checkpoint: megatron-core dist_checkpointing files (model,
                             optimizer, scheduler), rank_00000.pt... (per-rank RNG states) and meta.json
    <dir>/latest             the name of the newest complete checkpoint, replaced atomically
    <dir>/.tmp_step_00000050 a checkpoint being written; never loaded, removed at the next start

Every rank writes into the temporary folder; after a barrier rank 0 writes ``meta.json`` (with checksums
of the pickled metadata files), renames the folder to its final name (atomic on POSIX) and then
replaces ``latest``. A kill at any moment leaves the previous complete checkpoint as the newest one.
Loading trusts only folders with a valid ``meta.json`` whose checksums match, uses ``weights_only``
unpickling for r1mega's own files, and reshards across TP/PP/EP layouts through dist_checkpointing.

The distributed optimizer (ZeRO-1) resumes bit-identically through ``load_optimizer_state``: see its
docstring for the three things megatron-core 0.16.1 gets wrong with torch's AdamW and how they are
put right. Its ``dp_reshardable`` / ``dp_zero_gather_scatter`` formats store the optimizer state in
the layout of the gradient buffers, so they load only into the same TP/PP/EP layout and precision
(``check_optimizer_layout`` refuses others with a message before anything is read);
``fully_reshardable`` loads into any layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from r1mega.checkpoint.weights import sharded_model_state, sharding_metadata, unwrap
from r1mega.config.schema import R1Config
from r1mega.train.step import Trainer
from r1mega.utils.faults import kill_point
from r1mega.utils.logging import get_logger

log = get_logger(__name__)

FORMAT = "r1mega-ckpt/1"
_PICKLED = (".metadata", "common.pt")
"""Files dist_checkpointing reads with pickle; their checksums are recorded in meta.json."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: says which folder and why."""


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


# ------------------------------------------------------------------ distributed optimizer state
_PARAM_STATE_LOADERS = {
    "dp_reshardable": "load_parameter_state_from_dp_reshardable",
    "dp_zero_gather_scatter": "load_parameter_state_from_dp_zero",
    "fully_reshardable": "load_parameter_state_from_fully_reshardable",
    "fully_sharded_model_space": "load_parameter_state_from_fs_model_space",
}
"""DistributedOptimizer's loader for each ``param_state_sharding_type``."""
_LAYOUT_BOUND_FORMATS = ("dp_reshardable", "dp_zero_gather_scatter")
"""Distributed-optimizer formats that store state in grad-buffer order: same layout only."""


def _leaf_optimizers(optimizer: MegatronOptimizer) -> list[MegatronOptimizer]:
    """The optimizers inside a ChainedOptimizer (dense and expert parameters), or the optimizer itself."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_torch_adam(optimizer: MegatronOptimizer) -> bool:
    """torch's Adam/AdamW (megatron-core's fallback without TE or apex) keeps a per-parameter ``step``."""
    return isinstance(optimizer.optimizer, torch.optim.Adam)


def init_optimizer_state(optimizer: MegatronOptimizer) -> None:
    """Create the distributed optimizer's Adam state (zero moments, step 0) before a load.

    ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` builds its template from the current
    state (and asserts one common ``step``), so a freshly built optimizer cannot describe what it is
    about to load. megatron's training calls ``init_state_fn`` (zero moments) for this; torch's AdamW
    also needs its ``step``. Zero moments at step 0 is exactly the state AdamW creates at its first step,
    so unlike a throwaway optimizer step this changes nothing (no weight decay, no moved weights).
    """
    for opt in _leaf_optimizers(optimizer):
        if not isinstance(opt, DistributedOptimizer):
            continue  # the non-distributed optimizers initialise their own state in sharded_state_dict
        if opt.init_state_fn is not None:
            opt.init_state_fn(opt.optimizer, opt.config)
        if _is_torch_adam(opt):
            for group in opt.optimizer.param_groups:
                for param in group["params"]:
                    opt.optimizer.state[param].setdefault("step", torch.zeros((), dtype=torch.float32))


def load_optimizer_state(optimizer: MegatronOptimizer, state: dict[str, Any] | list | Any) -> None:
    """Load what ``dist_checkpointing.load`` returned for the optimizer, exactly.

    For the non-distributed optimizers this is ``optimizer.load_state_dict``. For megatron-core 0.16.1's
    DistributedOptimizer over torch's AdamW, ``load_state_dict`` alone does not resume exactly:

    1. it restores ``step`` as *one* tensor shared by every parameter, which AdamW then increments once per
       parameter at each step (bias corrections go wrong from the first step after the resume);
    2. it then copies every key of the live state from the checkpoint's per-parameter tensors, which
       carry no ``step``: ``dp_reshardable`` overwrites the restored step with the pre-load one (0), the
       other formats fail with ``KeyError: 'step'``;
    3. the fp32 main parameters are views of the model parameters, so copying into them outside
       ``torch.no_grad()`` fails (in-place operation on a view of a leaf that requires grad).

    So each distributed optimizer is loaded in two phases: ``load_state_dict`` without the parameter state
    (param groups with their common ``step``, grad scaler), then megatron's loader for the parameter state
    with ``step`` taken out of the live state, and finally one fresh ``step`` tensor per parameter from the
    loaded param groups, as torch's own ``load_state_dict`` would create. Runs under ``torch.no_grad()``.
    """
    leaves = _leaf_optimizers(optimizer)
    if not any(isinstance(opt, DistributedOptimizer) for opt in leaves):
        optimizer.load_state_dict(state)
        return
    # A ChainedOptimizer of several optimizers saves one entry per optimizer, keyed by index.
    states = [state] if len(leaves) == 1 else [state[key] for key in sorted(state)]
    with torch.no_grad():
        for opt, opt_state in zip(leaves, states, strict=True):
            if isinstance(opt, DistributedOptimizer):
                _load_distributed_optimizer(opt, opt_state)
            else:
                opt.load_state_dict(opt_state)


def optimizer_layout(config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """What a layout-bound distributed-optimizer checkpoint must match: the grad-buffer layout's inputs.

    ``config`` is an ``R1Config`` as a dict (``meta.json`` stores one).
    """
    par, prec = config["parallel"], config["precision"]
    tp, pp, cp = par["tensor_model_parallel_size"], par["pipeline_model_parallel_size"], par["context_parallel_size"]
    return {
        "TP": tp,
        "PP": pp,
        "VPP": par["virtual_pipeline_model_parallel_size"] or 1,
        "CP": cp,
        "EP": par["expert_model_parallel_size"],
        "ETP": par["expert_tensor_parallel_size"] or tp,
        "DP": world_size // (tp * pp * cp),
        "overlap_grad_reduce": par["overlap_grad_reduce"],
        "dtype": prec["dtype"],
        "grad_reduce_in_fp32": prec["grad_reduce_in_fp32"],
    }


def _load_distributed_optimizer(opt: DistributedOptimizer, state: dict[str, Any]) -> None:
    state = dict(state)
    param_state = state.pop("param_state", None)
    kind = state.pop("param_state_sharding_type", None)
    opt.load_state_dict(state)  # param groups (lr, wd, common step) and grad scaler; keeps the state tensors
    adam = _is_torch_adam(opt)
    if adam:
        for param_state_now in opt.optimizer.state.values():
            param_state_now.pop("step", None)
    if kind is not None:
        getattr(opt, _PARAM_STATE_LOADERS[kind])(param_state)
    if adam:
        for group in opt.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for param in group["params"]:
                opt.optimizer.state[param]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


class CheckpointManager:
    """Saves and finds complete checkpoints in one folder; every method is collective unless noted."""

    def __init__(self, cfg: R1Config, directory: str | None = None) -> None:
        self.cfg = cfg
        self.dir = Path(directory or cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints"))
        self.keep_last = cfg.checkpoint.keep_last
        self.rank = dist.get_rank()
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

    def latest(self) -> Path | None:
        """The newest complete checkpoint: ``latest`` if it names one, else the highest step (local)."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            candidate = self.dir / pointer.read_text().strip()
            if (candidate / "meta.json").is_file():
                return candidate
        done = self.complete()
        return done[-1] if done else None

    # ---------------------------------------------------------------- saving
    def _state(self, trainer: Trainer, loading: bool, optimizer_format: str) -> dict[str, Any]:
        model = {"model": sharded_model_state(trainer.model)}
        metadata = {**sharding_metadata(), "distrib_optim_sharding_type": optimizer_format}
        return {
            **model,
            "optimizer": trainer.optimizer.sharded_state_dict(model, is_loading=loading, metadata=metadata),
            "scheduler": trainer.scheduler.state_dict(),
        }

    def save(self, step: int, trainer: Trainer, stage_state: dict[str, Any]) -> Path:
        """Write a complete checkpoint for ``step`` and publish it atomically; prune old ones."""
        final = self.dir / _step_name(step)
        tmp = self.dir / f".tmp_{_step_name(step)}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(self._state(trainer, False, self.cfg.checkpoint.optimizer_format), str(tmp))
        torch.save(rng_state(), tmp / f"rank_{self.rank:05d}.pt")
        kill_point("checkpoint_write", step)
        dist.barrier()
        if self.rank == 0:
            meta = {
                "format": FORMAT,
                "step": step,
                "world_size": dist.get_world_size(),
                "stage_state": stage_state,
                "config": asdict(self.cfg),
                "sha256": {name: _sha256(tmp / name) for name in _PICKLED if (tmp / name).exists()},
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
        log.info("saved checkpoint %s", final)
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

    def check_optimizer_layout(self, path: Path, meta: dict[str, Any]) -> str:
        """The optimizer format ``path`` was saved in, after checking this run can load it (local).

        Raises ``CheckpointError`` (on every rank, before any collective) when the optimizer kinds differ
        (distributed or not) or a layout-bound distributed-optimizer format meets another layout.
        """
        saved = meta["config"]
        saved_format = saved["checkpoint"]["optimizer_format"]
        saved_distributed = saved["parallel"]["use_distributed_optimizer"]
        if saved_distributed != self.cfg.parallel.use_distributed_optimizer:
            raise CheckpointError(
                f"{path} was saved with parallel.use_distributed_optimizer={str(saved_distributed).lower()}; "
                "its optimizer state loads only with the same setting: run with "
                f"parallel.use_distributed_optimizer={str(saved_distributed).lower()}"
            )
        if saved_distributed and saved_format in _LAYOUT_BOUND_FORMATS:
            then = optimizer_layout(saved, meta["world_size"])
            now = optimizer_layout(asdict(self.cfg), dist.get_world_size())
            if then != now:
                differ = ", ".join(f"{key} {then[key]} -> {now[key]}" for key in then if then[key] != now[key])
                raise CheckpointError(
                    f"{path} holds distributed-optimizer state in checkpoint.optimizer_format={saved_format}, "
                    f"which loads only into the layout it was saved with ({differ}). Resume with the saved "
                    "layout, or save with checkpoint.optimizer_format=fully_reshardable to change layouts"
                )
        return saved_format

    def load(self, path: Path, trainer: Trainer) -> tuple[int, dict[str, Any]]:
        """Restore model, optimizer, scheduler and (same world size) RNG; returns (step, stage state)."""
        meta = self.read_meta(path)
        optimizer_format = self.check_optimizer_layout(path, meta)
        init_optimizer_state(trainer.optimizer)
        state = self._state(trainer, True, optimizer_format)
        loaded = dist_checkpointing.load(state, str(path))
        for i, chunk in enumerate(trainer.model):
            unwrap(chunk).load_state_dict(loaded["model"][f"model{i}"])
        load_optimizer_state(trainer.optimizer, loaded["optimizer"])
        trainer.scheduler.load_state_dict(loaded["scheduler"])
        rng_file = path / f"rank_{self.rank:05d}.pt"
        if meta["world_size"] == dist.get_world_size() and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            log.warning("%s was saved by %d ranks: RNG states not restored", path, meta["world_size"])
        log.info("resumed from %s (step %d)", path, meta["step"])
        return int(meta["step"]), meta.get("stage_state", {})
