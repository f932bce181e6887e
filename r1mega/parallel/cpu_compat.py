"""Every accommodation megatron-core 0.16.1 needs to train on a machine without CUDA, in one place.

megatron-core assumes CUDA in places that have nothing to do with the maths: tensors created with
``device="cuda"`` or ``torch.cuda.current_device()``, ``pin_memory=True``, CUDA streams and events,
the CUDA RNG tracker, optimizer type checks against ``'torch.cuda.FloatTensor'``, and split sizes that
only become host lists when they start on a GPU. ``apply()`` installs the accommodations below; it
does nothing when CUDA is available, so GPU runs use megatron-core untouched.

``tests/parallel/test_cpu_compat.py`` holds a probe per accommodation: code that exercises the
megatron-core path it exists for. Each probe runs in a fresh process without the accommodation (it
must fail: otherwise the accommodation is no longer needed and should go) and with it (it must pass).

The accommodations:

1. ``cuda_device_shim``: inside the listed megatron-core modules, the name ``torch`` is bound to a
   proxy whose factory functions map ``device="cuda"`` to the CPU and drop ``pin_memory``, and whose
   ``torch.cuda`` answers ``current_device()`` with ``"cpu"`` and gives inert streams and events.
   Only these modules see the proxy; the rest of the process sees the real ``torch``.
2. ``cuda_rng_tracker``: megatron's RNG tracker sets CUDA generator states through torch's lazy-CUDA
   call queue, which never runs on a CPU build: ``fork()`` would silently not switch states, and every
   call would grow ``torch.cuda._queued_calls`` for good (TP+SP forks on every forward). The get/set
   functions act on a dedicated CPU ``torch.Generator`` instead. Dropout inside TP regions then draws
   from the default CPU generator (r1mega's models use no dropout).
3. ``fp32_type_checks``: the optimizer classes compare ``param.type()`` with
   ``'torch.cuda.FloatTensor'`` (and the half types with their CUDA names); the comparisons are
   rewritten to accept the CPU type names too.
4. ``alltoall_split_sizes``: the alltoall token dispatcher turns split sizes into host lists only for
   CUDA tensors; gloo's ``all_to_all_single`` rejects tensor split sizes (EP > 1).
5. ``missing_te_gemm``: without Transformer Engine, ``moe_utils.te_general_gemm`` is never defined and
   every router fails with NameError; it is defined as None.
6. ``tensor_cuda_calls``: ``.cuda()`` on the embedding shared between the first and last pipeline
   stages (tied embeddings, or MTP on the last stage) is dropped, and on the distributed optimizer's
   state shards it all-gathers to save a ``fully_reshardable`` checkpoint.
7. ``te_stand_ins``: without TE, megatron-core's TE extension module still imports with mock classes,
   and MLA then calls ``isinstance`` with a mock; MLA is told TE is absent.

Fusions that need TE or apex are switched off in the model config (``r1mega.models.builder``), and
norms that must work under sequence parallelism come from r1mega's own spec (``r1mega.models.spec``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import textwrap
import types
from collections.abc import Callable
from typing import Any

import torch

SHIMMED_MODULES: list[str] = [
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.parallel_state",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.mlp",
    "megatron.core.transformer.module",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.shared_experts",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.multi_token_prediction",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
]
"""megatron-core modules that create CUDA tensors or use CUDA streams on r1mega's training paths."""

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like")


def _cpu_device(device: Any) -> Any:
    """Map any CUDA device spec to the CPU; leave others alone."""
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "cpu"
    return device


class _NullStream:
    """Stands in for ``torch.cuda.Stream`` / ``Event``: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullStream:
        return _NullStream()

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_NULL_STREAM = _NullStream()
_CPU_CUDA_GENERATOR = torch.Generator()
"""The stand-in for the CUDA default generator that megatron's RNG tracker saves and restores."""


class _CudaOnCpu(types.ModuleType):
    """``torch.cuda`` as seen by shimmed modules."""

    Stream = _NullStream
    Event = _NullStream

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def current_stream(device: Any = None) -> _NullStream:
        return _NULL_STREAM

    default_stream = current_stream

    @staticmethod
    def stream(stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return _CPU_CUDA_GENERATOR.get_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        _CPU_CUDA_GENERATOR.set_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        _CPU_CUDA_GENERATOR.manual_seed(seed)

    random = property(lambda self: self)  # torch.cuda.random.get_rng_state(device=...)


class _TorchOnCpu(types.ModuleType):
    """``torch`` as seen by shimmed modules: CUDA device arguments become the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, self._cpu_factory(getattr(torch, name)))

    @staticmethod
    def _cpu_factory(fn: Callable) -> Callable:
        def factory(*args: Any, **kwargs: Any) -> torch.Tensor:
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            kwargs.pop("pin_memory", None)
            return fn(*args, **kwargs)

        return factory

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        setattr(self, name, value)  # cache: later lookups skip __getattr__
        return value


_TORCH_ON_CPU = _TorchOnCpu()


def _shim_modules() -> None:
    for name in SHIMMED_MODULES:
        importlib.import_module(name).torch = _TORCH_ON_CPU


def _rng_tracker() -> None:
    random = importlib.import_module("megatron.core.tensor_parallel.random")

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return _CPU_CUDA_GENERATOR.get_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        _CPU_CUDA_GENERATOR.set_state(new_state)

    random._get_cuda_rng_state = get_state
    random._set_cuda_rng_state = set_state


def _rewrite(owner: Any, attr: str, *replacements: tuple[str, str]) -> None:
    """Recompile ``owner.attr`` with each ``(old, new)`` replaced in its source, in its module's globals.

    Raises if an ``old`` is not found, so a megatron-core upgrade that changes the code fails loudly.
    """
    fn = inspect.getattr_static(owner, attr)
    wrapper = type(fn) if isinstance(fn, (staticmethod, classmethod)) else None
    func = fn.__func__ if wrapper else fn
    source = textwrap.dedent(inspect.getsource(func))
    for old, new in replacements:
        if old not in source:
            raise RuntimeError(
                f"r1mega.cpu_compat: {func.__qualname__} no longer contains {old!r}; update the accommodation"
            )
        source = source.replace(old, new)
    if "__class__" in func.__code__.co_freevars:  # bare super() needs the class cell: name the class
        source = source.replace("super()", f"super({owner.__name__}, self)")
    lines = source.splitlines()
    while lines[0].lstrip().startswith("@"):  # drop decorators; re-wrapped below
        lines.pop(0)
    namespace: dict[str, Any] = {}
    code = compile("\n".join(lines), inspect.getsourcefile(func) or "<cpu_compat>", "exec")
    exec(code, {**func.__globals__, owner.__name__: owner} if isinstance(owner, type) else func.__globals__, namespace)  # noqa: S102 - recompiling megatron-core's own source
    new_func = namespace[func.__name__]
    new_func.__qualname__ = func.__qualname__
    replacement = wrapper(new_func) if wrapper else new_func
    setattr(owner, attr, replacement)
    if isinstance(owner, types.ModuleType):  # modules that imported the function by name
        for module in list(sys.modules.values()):
            # sys.modules may hold non-module objects without __name__ (seen on the H200 image)
            name = getattr(module, "__name__", None)
            if isinstance(name, str) and name.startswith("megatron.") and getattr(module, attr, None) is fn:
                setattr(module, attr, replacement)


_FP32 = ("== 'torch.cuda.FloatTensor'", "in ('torch.cuda.FloatTensor', 'torch.FloatTensor')")
_HALF = (
    "in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']",
    "in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor', 'torch.HalfTensor', 'torch.BFloat16Tensor']",
)


def _fp32_type_checks() -> None:
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    clip = importlib.import_module("megatron.core.optimizer.clip_grads")
    _rewrite(optimizer.Float16OptimizerWithFloat16Params, "__init__", _FP32, _HALF)
    _rewrite(distrib.DistributedOptimizer, "_build_model_and_main_param_groups", _FP32, _HALF)
    _rewrite(distrib.DistributedOptimizer, "__init__", _HALF)
    _rewrite(clip, "clip_grad_by_total_norm_fp32", _FP32)


def _tensor_cuda_calls() -> None:
    language_module = importlib.import_module("megatron.core.models.common.language_module.language_module")
    _rewrite(language_module.LanguageModule, "setup_embeddings_and_output_layer", ("weight.data.cuda()", "weight.data"))
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    _rewrite(distrib.DistributedOptimizer, "get_parameter_state_dp_zero", ("send_tensor.cuda()", "send_tensor"))


def _alltoall_split_sizes() -> None:
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    original = dispatcher.maybe_move_tensor_to_cpu

    def to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        tensor = original(tensor, as_numpy=as_numpy, record_stream=False)
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()
        return tensor

    dispatcher.maybe_move_tensor_to_cpu = to_host


def _missing_te_gemm() -> None:
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    for name in ("te_general_gemm", "fused_topk_with_score_function", "fused_compute_score_for_moe_aux_loss"):
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


def _te_stand_ins() -> None:
    # Without TE, megatron.core.extensions.transformer_engine still imports (its `te` is a MagicMock),
    # so MLA believes TE is present and calls isinstance() with a mock as the class.
    mla = importlib.import_module("megatron.core.transformer.multi_latent_attention")
    mla.HAVE_TE = False


ACCOMMODATIONS: dict[str, Callable[[], None]] = {
    "cuda_device_shim": _shim_modules,
    "cuda_rng_tracker": _rng_tracker,
    "fp32_type_checks": _fp32_type_checks,
    "alltoall_split_sizes": _alltoall_split_sizes,
    "tensor_cuda_calls": _tensor_cuda_calls,
    "missing_te_gemm": _missing_te_gemm,
    "te_stand_ins": _te_stand_ins,
}
"""Name -> installer. tests/parallel/test_cpu_compat.py holds a probe per name."""

WITHOUT_TE = ("missing_te_gemm", "te_stand_ins")
"""The accommodations a CUDA run without Transformer Engine needs too (``r1mega.parallel.bootstrap``)."""

_APPLIED: list[str] = []


def apply(force: bool = False, only: list[str] | None = None) -> list[str]:
    """Install the accommodations (once) when CUDA is absent; returns the names installed."""
    unknown = set(only or ()) - set(ACCOMMODATIONS)
    if unknown:
        raise ValueError(f"unknown CPU accommodation(s) {sorted(unknown)}; valid: {sorted(ACCOMMODATIONS)}")
    if torch.cuda.is_available() and not force:
        return []
    for name, install in ACCOMMODATIONS.items():
        if name in _APPLIED or (only is not None and name not in only):
            continue
        install()
        _APPLIED.append(name)
    return list(_APPLIED)
