"""The rollout engine under TP=2 and EP=2 (two gloo processes) gives the single-process tokens."""

import json
import os

import pytest
from dist_utils import run_ranks

WORKER = os.path.join(os.path.dirname(__file__), "engine_worker.py")


def _read(out, layout, model, rank):
    with open(os.path.join(out, f"{layout}-{model}-rank{rank}.json")) as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen2_tiny", "dsv3_tiny"])
def test_tensor_parallel_matches_single_process(tmp_path, model):
    run_ranks(WORKER, [str(tmp_path), model, "single"], world_size=1)
    run_ranks(WORKER, [str(tmp_path), model, "tp2"], world_size=2)
    ref = _read(tmp_path, "single", model, 0)
    for rank in range(2):
        got = _read(tmp_path, "tp2", model, rank)
        for mode in ("greedy", "sampled", "continuous"):  # same prompts and seeds on both TP ranks: same tokens
            for i, (tokens, logprobs) in ref[mode].items():
                assert got[mode][i][0] == tokens, (mode, i, rank)
                assert got[mode][i][1] == pytest.approx(logprobs, abs=1e-4)


@pytest.mark.slow
def test_expert_parallel_ranks_with_different_work_match_single_process(tmp_path):
    """Each EP rank samples its own prompts with its own length limit; ranks that finish first keep
    serving the others' MoE exchanges (no hang), and every greedy completion equals the single run's. With
    continuous batching (ranks refilling rows at different steps), every sampled sequence equals the single
    run's with the same seed."""
    run_ranks(WORKER, [str(tmp_path), "dsv3_tiny", "single"], world_size=1)
    run_ranks(WORKER, [str(tmp_path), "dsv3_tiny", "ep2"], world_size=2)
    for mode in ("greedy", "continuous"):
        ref = _read(tmp_path, "single", "dsv3_tiny", 0)[mode]
        seen = set()
        for rank in range(2):
            got = _read(tmp_path, "ep2", "dsv3_tiny", rank)[mode]
            for i, (tokens, logprobs) in got.items():
                assert len(tokens) == 10 - 3 * rank
                assert tokens == ref[i][0][: len(tokens)], (mode, i)
                assert logprobs == pytest.approx(ref[i][1][: len(tokens)], abs=1e-4)
                seen.add(i)
        assert seen == set(ref)
