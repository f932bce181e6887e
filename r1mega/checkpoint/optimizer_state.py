"""Optimizer state in training checkpoints: exact resume and loading into another parallel layout.

``CheckpointManager`` builds the optimizer's sharded state dict with megatron-core and lets
``dist_checkpointing`` do the resharding of the tensors. This module holds what megatron-core 0.16.1
leaves to the caller:

- ``init_optimizer_state`` / ``load_optimizer_state``: the distributed optimizer (ZeRO-1) over torch's
  AdamW (megatron-core's optimizer without TE or apex) resumes bit-identically only when its state exists
  before the load and its per-parameter ``step`` is restored by hand (see ``load_optimizer_state``).
- ``regroup``: with expert parallelism megatron-core uses two optimizers (dense and expert parameters)
  and without it one, so the optimizer's non-tensor state (param groups, Adam step) is stored in another
  structure; when the structures differ, that part is rebuilt from this run's optimizer.
- ``zero_padding``: deterministic ``dp_reshardable`` files.
- ``optimizer_layout``: what a layout-bound distributed-optimizer checkpoint must match.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import (
    LocalNonpersistentObject,
    ShardedBase,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from r1mega.config.schema import R1Config

LAYOUT_BOUND_FORMATS = ("dp_reshardable", "dp_zero_gather_scatter")
"""Distributed-optimizer formats that store the state in gradient-buffer order: they load only into the
layout they were saved from (``fully_reshardable`` stores it per model tensor and loads into any)."""

_PARAM_STATE_LOADERS = {
    "dp_reshardable": "load_parameter_state_from_dp_reshardable",
    "dp_zero_gather_scatter": "load_parameter_state_from_dp_zero",
    "fully_reshardable": "load_parameter_state_from_fully_reshardable",
    "fully_sharded_model_space": "load_parameter_state_from_fs_model_space",
}
"""DistributedOptimizer's loader for each ``param_state_sharding_type``."""


def save_metadata(cfg: R1Config) -> dict[str, Any]:
    """The optimizer's sharded-state-dict options a checkpoint is saved with (recorded in ``meta.json``).

    ``chained_optim_avoid_prefix`` (as megatron's training sets it): the tensor keys of the dense and the
    expert optimizer name the model tensor only, not the optimizer's index, so they match in any EP layout.
    megatron-core prefixes them anyway whenever a ``distrib_optim_sharding_type`` is given that is not
    fully reshardable, so the format is passed only with the distributed optimizer.
    """
    metadata: dict[str, Any] = {"chained_optim_avoid_prefix": True}
    if cfg.parallel.use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = cfg.checkpoint.optimizer_format
    return metadata


def leaf_optimizers(optimizer: MegatronOptimizer) -> list[MegatronOptimizer]:
    """The optimizers inside a ChainedOptimizer (dense and expert parameters), or the optimizer itself."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_torch_adam(optimizer: MegatronOptimizer) -> bool:
    """torch's Adam/AdamW (megatron-core's fallback without TE or apex) keeps a per-parameter ``step``."""
    return isinstance(optimizer.optimizer, torch.optim.Adam)


def optimizer_layout(config: dict[str, Any]) -> dict[str, Any]:
    """The inputs of the gradient-buffer layout that a layout-bound checkpoint must match.

    ``config`` is an ``R1Config`` as a dict (``meta.json`` stores one). Data parallelism is not among them:
    ``dp_reshardable`` stores each bucket without its DP-dependent end padding, so it loads with another DP
    size (measured: DP=2 -> DP=1 continues within 1e-8 of the DP=2 run).
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
        "overlap_grad_reduce": par["overlap_grad_reduce"],
        "dtype": prec["dtype"],
        "grad_reduce_in_fp32": prec["grad_reduce_in_fp32"],
    }


def adam_step(optimizer: MegatronOptimizer) -> float | None:
    """The Adam step count (common to every parameter), or None before the first step."""
    for opt in leaf_optimizers(optimizer):
        for param_state in opt.optimizer.state.values():
            if "step" in param_state:
                return float(param_state["step"])
        for group in opt.optimizer.param_groups:  # TE / apex FusedAdam keep it in the param groups
            if group["params"] and group.get("step") is not None:
                return float(group["step"])
    return None


def init_optimizer_state(optimizer: MegatronOptimizer) -> None:
    """Create the distributed optimizer's Adam state (zero moments, step 0) before a load.

    ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` builds its template from the current
    state (and asserts one common ``step``), so a freshly built optimizer cannot describe what it is
    about to load. megatron's training calls ``init_state_fn`` (zero moments) for this; torch's AdamW
    also needs its ``step``. Zero moments at step 0 is exactly the state AdamW creates at its first step,
    so unlike a throwaway optimizer step this changes nothing (no weight decay, no moved weights).
    """
    for opt in leaf_optimizers(optimizer):
        if not isinstance(opt, DistributedOptimizer):
            continue  # the non-distributed optimizers initialise their own state in sharded_state_dict
        if opt.init_state_fn is not None:
            opt.init_state_fn(opt.optimizer, opt.config)
        if _is_torch_adam(opt):
            for group in opt.optimizer.param_groups:
                for param in group["params"]:
                    opt.optimizer.state[param].setdefault("step", torch.zeros((), dtype=torch.float32))


def zero_padding(state: Any) -> None:
    """Zero the padding pieces of a ``dp_reshardable`` optimizer state before it is saved.

    megatron-core fills the gaps between parameters in a gradient bucket with ``torch.empty``: saved as
    is, a checkpoint holds uninitialised memory and two saves of the same state differ. Zeroed, identical
    states give identical files (and a resumed run can be compared with an uninterrupted one bit for bit).
    """
    if isinstance(state, dict):
        padding = state.get("padding")
        if isinstance(padding, LocalNonpersistentObject) and padding.unwrap() is True:
            for value in state.values():
                if isinstance(value, ShardedTensor):
                    value.data.zero_()
            return
        for value in state.values():
            zero_padding(value)
    elif isinstance(state, list):
        for value in state:
            zero_padding(value)


_LOADED = object()
"""Marks, in a template skeleton, a place that ``dist_checkpointing.load`` fills with a tensor."""


def skeleton(template: Any) -> Any:
    """A copy of a sharded state dict's structure: sharded entries become ``_LOADED``, the rest plain copies.

    Taken before ``dist_checkpointing.load`` (which consumes the template), for ``regroup``.
    """
    if isinstance(template, dict):
        return {key: skeleton(value) for key, value in template.items()}
    if isinstance(template, list):
        return [skeleton(value) for value in template]
    if isinstance(template, (ShardedBase, ShardedTensorFactory)):
        return _LOADED
    if isinstance(template, LocalNonpersistentObject):
        return copy.deepcopy(template.unwrap())
    return copy.deepcopy(template)


def regroup(skel: Any, loaded: Any, step: float | None) -> Any | None:
    """The loaded optimizer state in this run's structure, or None when it already is.

    ``dist_checkpointing.load`` puts the loaded tensors where this run's template had them, but merges
    in the checkpoint's non-tensor state (param groups, Adam step) in the structure it was saved with:
    one optimizer with EP=1, a dense and an expert optimizer with EP>1. When the two differ, the state
    is rebuilt from the loaded tensors, this run's own param groups (their learning rate and weight
    decay are set again when the LR schedule loads) and the saved Adam ``step`` (``meta.json``).
    """
    if not isinstance(skel, dict) or not isinstance(loaded, dict) or set(skel) == set(loaded):
        return None
    state = _fill(skel, loaded)
    if step is not None:
        _set_step(state, step)
    return state


def _set_step(state: Any, step: float) -> None:
    """Put the Adam step where megatron-core's optimizers read it on load."""
    if isinstance(state, dict):
        for group in state.get("param_groups", []):  # DistributedOptimizer; TE / apex FusedAdam
            if "step" in group:
                group["step"] = step
        if isinstance(state.get("state"), dict) and "param_groups" in state:  # the non-distributed optimizers
            state["state"]["common_step"] = torch.tensor(step, dtype=torch.float32)
        for value in state.values():
            _set_step(value, step)
    elif isinstance(state, list):
        for value in state:
            _set_step(value, step)


def _fill(skel: Any, loaded: Any) -> Any:
    if skel is _LOADED:
        return loaded
    if isinstance(skel, dict):
        return {key: _fill(value, loaded.get(key) if isinstance(loaded, dict) else None) for key, value in skel.items()}
    if isinstance(skel, list):
        return [
            _fill(value, loaded[i] if isinstance(loaded, list) and i < len(loaded) else None)
            for i, value in enumerate(skel)
        ]
    return skel


def load_optimizer_state(optimizer: MegatronOptimizer, state: Any) -> None:
    """Load what ``dist_checkpointing.load`` returned for the optimizer, exactly.

    For the non-distributed optimizers this is ``optimizer.load_state_dict``. For megatron-core 0.16.1's
    DistributedOptimizer over torch's AdamW, ``load_state_dict`` alone does not resume exactly:

    1. it restores ``step`` as *one* tensor shared by every parameter, which AdamW then increments once per
       parameter at each step (the bias corrections are wrong from the first step after the resume);
    2. it then copies every key of the live state from the checkpoint's per-parameter tensors, which
       carry no ``step``: ``dp_reshardable`` overwrites the restored step with the pre-load one, the
       other formats fail with ``KeyError: 'step'``;
    3. the fp32 main parameters are views of the model parameters, so copying into them outside
       ``torch.no_grad()`` fails (in-place operation on a view of a leaf that requires grad).

    So each distributed optimizer is loaded in two phases: ``load_state_dict`` without the parameter state
    (param groups with their common ``step``, grad scaler), then megatron's loader for the parameter state
    with ``step`` taken out of the live state, and finally one fresh ``step`` tensor per parameter from the
    loaded param groups. Runs under ``torch.no_grad()``. Needs ``init_optimizer_state`` before the template
    for ``dist_checkpointing.load`` is built.
    """
    leaves = leaf_optimizers(optimizer)
    if not any(isinstance(opt, DistributedOptimizer) for opt in leaves):
        optimizer.load_state_dict(state)
        return
    states = [state] if len(leaves) == 1 else [state[i] for i in range(len(leaves))]  # ChainedOptimizer: by index
    with torch.no_grad():
        for opt, opt_state in zip(leaves, states, strict=True):
            if isinstance(opt, DistributedOptimizer):
                _load_distributed_optimizer(opt, opt_state)
            else:
                opt.load_state_dict(opt_state)


def _load_distributed_optimizer(opt: DistributedOptimizer, state: dict[str, Any]) -> None:
    state = dict(state)
    param_state = state.pop("param_state", None)
    kind = state.pop("param_state_sharding_type", None)
    opt.load_state_dict(state)  # param groups (lr, wd, common step) and grad scaler; keeps the state tensors
    adam = _is_torch_adam(opt)
    if adam:
        for tensors in opt.optimizer.state.values():
            tensors.pop("step", None)
    if kind is not None:
        getattr(opt, _PARAM_STATE_LOADERS[kind])(param_state)
    if adam:
        for group in opt.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for param in group["params"]:
                opt.optimizer.state[param]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
