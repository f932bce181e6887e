"""``bench/gpu_train.py`` runs every part end to end at toy sizes on the CPU (a smoke test: nothing is timed against
a target here; the numbers that matter come from the H200 run in ``tools/gpu_check.sh``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_train.py"
_spec = importlib.util.spec_from_file_location("gpu_train", BENCH)
gpu_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_train)


def test_help() -> None:
    result = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--only" in result.stdout and "--tiny" in result.stdout


def test_unknown_part_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--tiny", "--only", "dense,moe"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "unknown part" in result.stderr


def test_kernel_names_land_in_their_buckets() -> None:
    cases = {
        "nvjet_sm90_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "gemm",
        "sm90_xmma_gemm_e4m3e4m3_e4m3f32_f32_tn_n_tilesize128x128x128": "gemm",
        "pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel": "attention",
        "fmha_cutlassF_bf16_aligned_64x128_rf_sm80": "attention",
        "void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16>": "index/sort/topk",
        "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>": "elementwise/norm/reduce",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "communication",
        "Memcpy DtoD (Device -> Device)": "memcpy/memset",
        "aten::mm": "gemm",
        "aten::_grouped_mm": "gemm",
    }
    for name, bucket in cases.items():
        assert gpu_train.classify(name) == bucket, name


def test_self_times_subtract_nested_ops() -> None:
    # (name, thread, start, end): mm inside linear inside matmul-free parent; a sibling after it
    ops = [("aten::linear", 1, 0, 100), ("aten::mm", 1, 10, 70), ("aten::t", 1, 0, 5), ("aten::add", 1, 100, 120)]
    got = {name: ns for name, _, ns in gpu_train._self_times(ops)}
    assert got == {"aten::linear": 35, "aten::mm": 60, "aten::t": 5, "aten::add": 20}


def test_markov_data_follows_its_successor_table() -> None:
    data = gpu_train.markov_data(16, 64, vocab=50, seed=3, fanout=4)
    assert data.shape == (16, 65) and 0 <= int(data.min()) and int(data.max()) < 50
    successors: dict[int, set[int]] = {}
    for row in data.tolist():
        for a, b in zip(row, row[1:], strict=False):
            successors.setdefault(a, set()).add(b)
    assert max(len(s) for s in successors.values()) <= 4  # at most `fanout` successors per token


@pytest.mark.slow
def test_tiny_cpu_run_prints_the_table_and_json(tmp_path: Path) -> None:
    # A generous budget: on a loaded shared machine the run must not cut its loss comparison short.
    result = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--tiny", "--budget-s", "400", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("=== bench/gpu_train.py") for line in lines), result.stdout[-3000:]
    payload = json.loads(next(line for line in lines if line.startswith("TRAIN_GPU "))[len("TRAIN_GPU ") :])
    for part in ("dense", "dsv3_seq", "dsv3"):
        r = payload[part]
        assert r["step_s"] > 0 and r["model_flops_per_step"] > 0, r
        assert 0 < r["mfu_square"] and 0 < r["mfu_same_shape"], r
    assert payload["dense"]["moe_experts"] is None
    assert payload["dsv3"]["moe_experts"] == "TorchGroupedMLP"
    assert payload["dsv3_seq"]["moe_experts"] == "SequentialMLP"
    assert "x faster than SequentialMLP" in result.stdout
    breakdown = payload["dsv3"]["breakdown"]["per_step_s"]
    assert breakdown["gemm"] > 0 and breakdown["optimizer"] > 0, breakdown
    launched = {part: payload[part]["breakdown"]["kernels_per_step"] for part in ("dsv3_seq", "dsv3")}
    assert launched["dsv3"] < launched["dsv3_seq"], launched  # grouped experts launch fewer kernels (aten ops here)
    fp8, loss = payload["fp8"], payload["loss"]
    assert fp8["bf16"]["step_s"] > 0 and (fp8["fp8"].get("step_s", 0) > 0 or "unavailable" in fp8["fp8"]), fp8
    assert loss["steps"] >= 20 and loss["bf16_final"] < loss["bf16_first"], loss  # the Markov chain is learnable
    if "fp8_final" in loss:
        assert loss["fp8_linears"] > 0 and abs(loss["rel_diff"]) < 0.05, loss
    parts = {"ceiling", "dense", "dsv3_seq", "dsv3", "fp8", "loss"}
    assert json.loads((tmp_path / "results.json").read_text()).keys() >= parts
