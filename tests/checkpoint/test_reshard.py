"""A full training checkpoint (model, optimizer, LR schedule) saved in one parallel layout loads in another.

The tiny DeepSeek-V3 model (MLA + MoE + MTP, fp32) goes through a chain of real gloo runs, each resuming
from the previous run's checkpoint with ``CheckpointManager.load`` and training on (reshard_worker.py):

    EP=2 (2 ranks) -> EP=1 (1 rank) -> TP=2 + SP (2 ranks) -> TP=1 (1 rank)

so EP 2 -> 1, TP 1 -> 2 and TP 2 -> 1 are each crossed once, with the optimizer state of the saving layout
(EP=2 keeps dense and expert parameters in two optimizers, EP=1 in one). Each link compares its logits on a
fixed batch (main and MTP heads) with what the saving run computed: right after the load (the weights
resharded) and after the next optimizer step (the Adam moments, step count and LR schedule resharded
too: one step moves these logits by about 0.1, so a lost moment would show).

Tolerance, fp32: logits within ``LOGIT_ATOL`` = 2e-6 absolute (measured: at most 4.2e-7, from the
different reduction order of another layout; logits are about 0.7 in size) and the next step's loss
within 1e-5 (measured: equal to the printed digits).
"""

from __future__ import annotations

import os

import pytest
import torch
from dist_utils import run_ranks

WORKER = os.path.join(os.path.dirname(__file__), "reshard_worker.py")
CHAIN = [("ep2", 2), ("single", 1), ("tp2", 2), ("single", 1)]
"""(parallel preset, ranks) of each link; each link resumes from the one before."""
LOGIT_ATOL = 2e-6
LOSS_ATOL = 1e-5


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> list[dict[int, dict]]:
    """Run the chain; each link's {step: {"logits": [mtp, main], "loss": float}}."""
    root = tmp_path_factory.mktemp("reshard")
    out, src = [], "-"
    for i, (layout, ranks) in enumerate(CHAIN):
        link = root / f"{i}_{layout}"
        link.mkdir()
        run_ranks(WORKER, [str(link), layout, src], ranks, timeout=400)
        out.append(torch.load(link / "trace.pt", weights_only=True))
        src = str(link)
    return out


def _assert_continues(saved: dict[int, dict], loaded: dict[int, dict]) -> None:
    """The loading run reproduces the saving run's logits at the load and after the next step."""
    load_step = min(loaded)
    assert load_step in saved and load_step + 1 in saved, (sorted(saved), sorted(loaded))
    for step in (load_step, load_step + 1):
        for head, (a, b) in enumerate(zip(saved[step]["logits"], loaded[step]["logits"], strict=True)):
            diff = (a - b).abs().max().item()
            assert diff <= LOGIT_ATOL, f"step {step}, head {head}: logits differ by {diff:.3g}"
    loss_saved, loss_loaded = saved[load_step + 1]["loss"], loaded[load_step + 1]["loss"]
    assert abs(loss_saved - loss_loaded) <= LOSS_ATOL, (loss_saved, loss_loaded)
    last = loaded[max(loaded)]
    assert torch.isfinite(torch.tensor(last["loss"])) and all(torch.isfinite(x).all() for x in last["logits"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "link", [1, 2, 3], ids=["ep2_saved_loads_at_ep1", "tp1_saved_loads_at_tp2", "tp2_saved_loads_at_tp1"]
)
def test_training_checkpoint_reshards(traces: list[dict[int, dict]], link: int) -> None:
    _assert_continues(traces[link - 1], traces[link])
