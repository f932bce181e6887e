"""TP=2, PP=2 (also with two virtual stages per rank: megatron's interleaved schedule) and EP=2 over two gloo
processes give the single-process loss and gradients (MoE + MLA + MTP), with megatron-core's SequentialMLP
experts and with grouped ones (``model.moe_experts=grouped``)."""

import json
import os

import pytest
from dist_utils import run_ranks

WORKER = os.path.join(os.path.dirname(__file__), "parity_worker.py")
LOSS_TOL = 1e-5
"""Absolute tolerance on the fp32 loss (reduction order differs between layouts)."""
GRAD_RTOL = 1e-4
"""Max |grad difference| per tensor, relative to that tensor's max |grad| (plus 1e-7 absolute)."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("parity"))
    run_ranks(WORKER, ["reference", out, "single"], world_size=1)
    with open(os.path.join(out, "reference.json")) as f:
        return out, json.load(f)


LAYOUTS = {
    "tp2": ["tp2"],
    "pp2": ["pp2"],
    # 4 layers as 4 virtual stages over 2 ranks, 2 micro-batches: each chunk must see every micro-batch in order
    "pp2vpp2": ["pp2", "parallel.virtual_pipeline_model_parallel_size=2"],
    "ep2": ["ep2"],
    # grouped experts (torch._grouped_mm) against the single process's SequentialMLP: expert and tensor
    # parallelism split their stacked weights, and their checkpoints load into SequentialMLP and back
    "ep2-grouped": ["ep2", "model.moe_experts=grouped"],
    "tp2-grouped": ["tp2", "model.moe_experts=grouped"],
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(reference, layout):
    out, ref = reference
    run_ranks(WORKER, ["parallel", out, *LAYOUTS[layout]], world_size=2)
    with open(os.path.join(out, "parallel.json")) as f:
        par = json.load(f)
    assert abs(par["lm_loss"] - ref["lm_loss"]) < LOSS_TOL, (layout, par, ref)
    run_ranks(WORKER, ["compare", out, "single"], world_size=1)
    with open(os.path.join(out, "compare.json")) as f:
        report = json.load(f)
    assert len(report) > 30  # every parameter of the model (plus the expert-bias buffers)
    bad = {k: v for k, v in report.items() if v[0] > GRAD_RTOL * v[1] + 1e-7}
    assert not bad, f"{layout}: gradients differ: {bad}"
    biases = [k for k in report if k.endswith("expert_bias")]
    assert biases, "the expert-bias buffers should be compared too"
