"""``r1mega-check`` end to end, in subprocesses as a user runs it."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys

import pytest


def _command() -> list[str]:
    """The installed console script, or the module when the package is not installed with scripts."""
    script = shutil.which("r1mega-check")
    return [script] if script else [sys.executable, "-m", "r1mega.cli.check"]


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*_command(), *args], capture_output=True, text=True, timeout=120)


def test_deepseek_v3_grpo_layout_prints_rl_memory_and_time() -> None:
    """The RL preset fits an H200 on every stage (reference, KV cache, activations included), not an H100."""
    result = run_check("model=deepseek_v3", "stage=grpo", "parallel=dsv3_grpo_256")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "GRPO step: 32 prompts x 16 samples, responses up to 32768 tokens" in out
    assert "KV cache 576 values/token/layer" in out and "recompute full" in out and "reference model on" in out
    stages = re.findall(r"stage +(\d+): model state .* = ([\d.]+) GiB \(fits\)", out)
    assert [int(s) for s, _ in stages] == list(range(16)), out
    assert 80 < max(float(gib) for _, gib in stages) < 141
    assert re.search(r"rollout \d+ s with 16 row groups in flight \(\d+ s with one", out)
    assert "refit into a generation layout without PP" in out
    h100 = run_check("model=deepseek_v3", "stage=grpo", "parallel=dsv3_grpo_256", "--gpu", "h100")
    assert h100.returncode == 0 and "DOES NOT FIT" in h100.stdout


def test_deepseek_v3_on_2048_ranks() -> None:
    result = run_check("model=deepseek_v3", "parallel=dsv3_2048", "precision=bf16")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "total 671.03B" in out
    assert re.search(r"activated per token 37\.\d\dB", out)
    assert re.search(r"MTP module: 11\.\d\dB", out)
    assert "DP 128" in out and "EP 64" in out and "expert-DP 2" in out
    assert "decoder layers per stage [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 1]" in out
    assert "4 per EP rank" in out
    assert "experts run as grouped GEMMs with Transformer Engine or in bf16 on Hopper" in out
    distributed = re.search(r"distributed optimizer: stage 0: .* = ([\d.]+) GiB <- configured", out)
    assert distributed and 17 < float(distributed.group(1)) < 20
    assert "training (3 x forward)" in out
    assert "(125 more)" in out  # 128 PP groups: only the first few are printed
    assert len(out.splitlines()) < 40


def test_world_size_option_and_vpp_chunks() -> None:
    result = run_check(
        "parallel=tp2",
        "--world-size",
        "8",
        "parallel.pipeline_model_parallel_size=2",
        "parallel.virtual_pipeline_model_parallel_size=2",
        "parallel.expert_model_parallel_size=2",
        "model.num_layers=8",
        "optim.global_batch_size=8",
    )
    assert result.returncode == 0, result.stderr
    assert "8 rank(s)" in result.stdout
    assert "stage 0: chunks 0-1, 4-5" in result.stdout and "stage 1: chunks 2-3, 6-7" in result.stdout


def test_never_imports_megatron_or_torch() -> None:
    code = (
        "import sys; from r1mega.cli.check import main; main(['model=deepseek_v3', 'parallel=dsv3_2048']); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('megatron', 'torch')]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_help() -> None:
    result = run_check("--help")
    assert result.returncode == 0
    assert "usage: r1mega-check" in result.stdout and "--world-size" in result.stdout


WRONG = [
    (["parallel.tensor_model_parallel_size=3"], "parallel.tensor_model_parallel_size"),
    (["model=nope"], "model"),
    (["model.foo=1"], "model.foo"),
    (["parallel=tp2", "parallel.sequence_parallel=false"], "parallel.sequence_parallel"),
    (["parallel=tp2", "--world-size", "3"], "parallel.tensor_model_parallel_size"),
    (
        ["model=deepseek_v3", "parallel=dsv3_2048", "parallel.expert_model_parallel_size=3"],
        "parallel.expert_model_parallel_size",
    ),
]


@pytest.mark.parametrize("args, key", WRONG, ids=[" ".join(a) for a, _ in WRONG])
def test_wrong_config_exits_2_with_one_line(args: list[str], key: str) -> None:
    result = run_check(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"r1mega: config error: {key}=")
    assert "Traceback" not in result.stderr and result.stdout == ""


def _has_cuda_and_te() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda_and_te(), reason="FP8 is valid on a machine with CUDA and Transformer Engine")
def test_te_fp8_without_transformer_engine_exits_2() -> None:
    result = run_check("precision=fp8", "precision.fp8_backend=te")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("r1mega: config error: precision.fp8_backend=")


def test_a_gpu_node_without_te_is_assumed_to_run_grouped_experts(monkeypatch) -> None:
    """Without torch the GPU's generation is unknown: model.moe_experts=grouped is not refused on a GPU node
    (the run validates again with the detected GPU), and a node without a GPU checks it as a CPU would."""
    from r1mega.cli import check
    from r1mega.config.load import compose_config
    from r1mega.config.validate import validate

    monkeypatch.setattr(check.importlib.util, "find_spec", lambda name: None)
    cfg = compose_config(["model.moe_experts=grouped", "precision=bf16", "parallel.world_size=1"])
    for gpu in (True, False):
        monkeypatch.setattr(check.os.path, "exists", lambda path, gpu=gpu: gpu and path == "/dev/nvidiactl")
        accel = check.accelerator()
        assert (accel.cuda, accel.grouped_gemm, accel.transformer_engine) == (gpu, gpu, False)
        assert validate(cfg, 1, accel) == 1
