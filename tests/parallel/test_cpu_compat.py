"""Every CPU accommodation in ``r1mega.parallel.cpu_compat`` is still needed, and together they suffice.

For each accommodation, tests/parallel/cpu_compat_probe.py holds a probe: the megatron-core code paths it
exists for. In a fresh process with every other accommodation installed, each check of the probe must
fail with the error the accommodation is there for (type, message, and the megatron-core file and line
it comes from); otherwise megatron-core no longer needs it and it should go. In a fresh process with all
of them, every check must pass. The single-process probes share one "with all" process; the EP=2 and
PP=2 probes run over two gloo processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass

import pytest
import torch
from dist_utils import run_ranks

from r1mega.parallel import cpu_compat

WORKER = os.path.join(os.path.dirname(__file__), "cpu_compat_probe.py")
_spec = importlib.util.spec_from_file_location("cpu_compat_probe", WORKER)
probe_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe_module)  # import-light: torch and cpu_compat only

TWO_PROCESS = sorted(name for name, layout in probe_module.LAYOUTS.items() if layout not in (None, "single"))
ONE_PROCESS = sorted(name for name in probe_module.PROBES if name not in TWO_PROCESS)
TIMEOUT = {1: 120, 2: 180}
"""Seconds per worker run by world size (a rank that fails alone leaves its peer in a collective)."""
NO_CUDA = r"^Torch not compiled with CUDA enabled$"
MISTYPED = r"^Wrapped parameters must be one of torch\.cuda\.FloatTensor, .* Received torch\.{}$"


@dataclass(frozen=True)
class Failure:
    """How a check must fail without its accommodation."""

    type: str
    message: str
    """A regular expression searched in the exception message."""
    where: str
    """The innermost megatron-core file of the traceback (the probe file for a failed probe assertion)."""
    line: str = ""
    """A regular expression searched in that frame's source line."""


EXPECTED: dict[str, Failure] = {
    "cuda_device_shim.rope": Failure(
        "AssertionError",
        NO_CUDA,
        "megatron/core/models/common/embeddings/rotary_pos_embedding.py",
        r"torch\.cuda\.current_device\(\)",
    ),
    "cuda_device_shim.yarn": Failure(
        "AssertionError",
        NO_CUDA,
        "megatron/core/models/common/embeddings/yarn_rotary_pos_embedding.py",
        r"torch\.cuda\.current_device\(\)",
    ),
    # With the shim, nothing crashes: the tracker's "set" is queued for a CUDA init that never comes.
    "cuda_rng_tracker.fork": Failure(
        "AssertionError",
        r"fork\(\) did not switch to the tracked CUDA RNG state \(switched=False\); [1-9]\d* CUDA RNG calls were queued",
        "cpu_compat_probe.py",
    ),
    "fp32_type_checks.fp32_distributed_optimizer": Failure(
        "TypeError", MISTYPED.format("FloatTensor"), "megatron/core/optimizer/distrib_optimizer.py"
    ),
    "fp32_type_checks.fp32_grad_clipping": Failure(
        "AssertionError", r"^$", "megatron/core/optimizer/clip_grads.py", r"== 'torch\.cuda\.FloatTensor'"
    ),
    "fp32_type_checks.bf16_optimizer": Failure(
        "TypeError", MISTYPED.format("BFloat16Tensor"), "megatron/core/optimizer/optimizer.py"
    ),
    "fp32_type_checks.bf16_distributed_optimizer": Failure(
        "TypeError", MISTYPED.format("BFloat16Tensor"), "megatron/core/optimizer/distrib_optimizer.py"
    ),
    # gloo is handed the split sizes as tensors: "..., tensor([17, 15]), tensor([17, 17]), <...AllToAllOptions"
    "alltoall_split_sizes.expert_parallel_alltoall": Failure(
        "TypeError",
        r"^all_to_all_single\(\): incompatible function arguments\..*tensor\(\[\d+, \d+\]\), tensor\(\[\d+, \d+\]\), <",
        "megatron/core/tensor_parallel/mappings.py",
    ),
    "tensor_cuda_calls.tied_embeddings": Failure(
        "AssertionError", NO_CUDA, "megatron/core/models/common/language_module/language_module.py", r"\.cuda\(\)"
    ),
    "tensor_cuda_calls.mtp_embedding": Failure(
        "AssertionError", NO_CUDA, "megatron/core/models/common/language_module/language_module.py", r"\.cuda\(\)"
    ),
    "missing_te_gemm.moe_router": Failure(
        "NameError", r"^name 'te_general_gemm' is not defined$", "megatron/core/transformer/moe/moe_utils.py"
    ),
    "te_stand_ins.mla": Failure(
        "TypeError",
        r"^isinstance\(\) arg 2 must be a type",
        "megatron/core/transformer/multi_latent_attention.py",
        r"isinstance\(self\.linear_proj, TELinear\)",
    ),
}


def _checks(name: str) -> list[str]:
    return [f"{name}.{check.__name__}" for check in probe_module.PROBES[name]]


def _run(without: str, probes: list[str], world_size: int) -> dict[tuple[str, int], dict]:
    """Run the worker over ``world_size`` fresh processes; its results keyed by (check, rank)."""
    outputs = run_ranks(WORKER, [without, *probes], world_size=world_size, timeout=TIMEOUT[world_size])
    results = {}
    for output in outputs:
        for line in output.splitlines():
            if line.startswith(probe_module.RESULT_TAG + " "):
                result = json.loads(line.split(" ", 1)[1])
                results[result["check"], result["rank"]] = result
    return results


def _assert_failed_as_expected(results: dict[tuple[str, int], dict], name: str, world_size: int) -> None:
    for check in _checks(name):
        expected = EXPECTED[check]
        for rank in range(world_size):
            got = results.get((check, rank))
            assert got is not None, f"{check} (rank {rank}) reported nothing"
            assert not got["ok"], f"{check} passed without {name}: megatron-core may no longer need it; remove it"
            summary = f"{check} (rank {rank}) failed differently than expected: {got}"
            assert got["type"] == expected.type, summary
            assert re.search(expected.message, got["message"], re.DOTALL), summary
            assert got["where"] == expected.where, summary
            assert re.search(expected.line, got["line"]), summary


def _assert_passed(results: dict[tuple[str, int], dict], name: str, world_size: int) -> None:
    for check in _checks(name):
        for rank in range(world_size):
            got = results.get((check, rank))
            assert got is not None, f"{check} (rank {rank}) reported nothing"
            assert got["ok"], f"{check} (rank {rank}) failed with every accommodation installed: {got}"


def test_every_accommodation_has_a_probe() -> None:
    assert set(probe_module.PROBES) == set(cpu_compat.ACCOMMODATIONS)
    assert set(probe_module.LAYOUTS) == set(cpu_compat.ACCOMMODATIONS)
    assert all(probe_module.PROBES.values()), "every probe needs at least one check"
    assert {check for name in probe_module.PROBES for check in _checks(name)} == set(EXPECTED)


def test_apply_does_nothing_where_cuda_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    applied, modules = list(cpu_compat._APPLIED), set(sys.modules)
    assert cpu_compat.apply() == []
    assert cpu_compat.apply(only=list(cpu_compat.ACCOMMODATIONS)) == []
    assert cpu_compat._APPLIED == applied
    assert not [m for m in set(sys.modules) - modules if m.startswith("megatron")], "apply() imported megatron-core"


@pytest.fixture(scope="module")
def one_process_with_all() -> dict[tuple[str, int], dict]:
    """Every single-process probe, in one fresh process with every accommodation installed."""
    return _run("none", ONE_PROCESS, world_size=1)


@pytest.mark.parametrize("name", ONE_PROCESS)
def test_probe_fails_without_its_accommodation(name: str) -> None:
    _assert_failed_as_expected(_run(name, [name], world_size=1), name, world_size=1)


@pytest.mark.parametrize("name", ONE_PROCESS)
def test_probe_passes_with_every_accommodation(name: str, one_process_with_all: dict) -> None:
    _assert_passed(one_process_with_all, name, world_size=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", TWO_PROCESS)
def test_two_process_probe_fails_without_its_accommodation(name: str) -> None:
    _assert_failed_as_expected(_run(name, [name], world_size=2), name, world_size=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", TWO_PROCESS)
def test_two_process_probe_passes_with_every_accommodation(name: str) -> None:
    _assert_passed(_run("none", [name], world_size=2), name, world_size=2)
