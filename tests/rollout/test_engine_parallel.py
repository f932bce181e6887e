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
        for mode in ("greedy", "sampled", "greedy@2", "sampled@3", "continuous"):  # TP ranks: the same tokens
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
    for mode in ("greedy", "greedy@2", "greedy@3", "continuous"):  # row groups: EP ranks agree on how many
        ref = _read(tmp_path, "single", "dsv3_tiny", 0)["greedy" if mode.startswith("greedy") else mode]
        seen = set()
        for rank in range(2):
            got = _read(tmp_path, "ep2", "dsv3_tiny", rank)[mode]
            for i, (tokens, logprobs) in got.items():
                assert len(tokens) == 10 - 3 * rank
                assert tokens == ref[i][0][: len(tokens)], (mode, i)
                assert logprobs == pytest.approx(ref[i][1][: len(tokens)], abs=1e-4)
                seen.add(i)
        assert seen == set(ref)


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """The one-process reference runs (and the weights every other layout loads), once per model."""
    out = tmp_path_factory.mktemp("single")
    for model in ("qwen2_tiny", "dsv3_tiny"):
        run_ranks(WORKER, [str(out), model, "single"], world_size=1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "layout", "world"),
    [("qwen2_tiny", "pp2", 2), ("dsv3_tiny", "pp2vpp2", 2), ("dsv3_tiny", "tp2pp2", 4)],
)
def test_pipeline_parallel_matches_single_process(single_runs, model, layout, world):
    """Pipelined decoding in the training layout (PP=2, virtual stages, TP=2 x PP=2; MLA latent cache, MoE):
    greedy and seeded-sampled tokens equal the single process's on every rank, and the sampler's generator
    ends in the same state on every pipeline stage (the last stage's draws, shared). With 2 and 3 row groups in
    flight, each equals the single process decoding the same groups in turn; greedy equals one batch."""
    run_ranks(WORKER, [str(single_runs), model, layout], world_size=world)
    ref = _read(single_runs, "single", model, 0)
    for rank in range(world):
        got = _read(single_runs, layout, model, rank)
        for suffix in ("", "@2", "@3"):
            assert got["generator" + suffix] == ref["generator" + suffix], (suffix, rank)
            for i, (tokens, logprobs) in ref["greedy"].items():
                assert got["greedy" + suffix][i][0] == tokens, (suffix, i, rank)
                assert got["greedy" + suffix][i][1] == pytest.approx(logprobs, abs=1e-5), (suffix, i, rank)
        for mode in ("greedy", "sampled", "greedy@2", "sampled@2", "greedy@3", "sampled@3"):
            for i, (tokens, logprobs) in ref[mode].items():
                assert got[mode][i][0] == tokens, (mode, i, rank)
                tol = 0 if "tp" not in layout else 1e-5  # PP alone computes the same ops on the same tensors
                assert got[mode][i][1] == pytest.approx(logprobs, abs=tol, rel=0), (mode, i, rank)


@pytest.mark.slow
def test_pipeline_and_expert_parallel_match_single_process(single_runs):
    """PP=2 x EP=2 (4 processes): the two pipelines are expert-parallel peers with their own prompts and
    length limits; each stage keeps serving its peer's MoE exchanges until both pipelines finish, with one
    batch and with row groups in flight (groups end at different steps on the two pipelines)."""
    run_ranks(WORKER, [str(single_runs), "dsv3_tiny", "pp2ep2"], world_size=4)
    ref = _read(single_runs, "single", "dsv3_tiny", 0)["greedy"]
    for mode in ("greedy", "greedy@2", "greedy@3"):
        seen = set()
        for rank in range(4):
            got = _read(single_runs, "pp2ep2", "dsv3_tiny", rank)[mode]
            for i, (tokens, logprobs) in got.items():
                assert tokens == ref[i][0][: len(tokens)], (mode, i, rank)
                assert logprobs == pytest.approx(ref[i][1][: len(tokens)], abs=1e-5)
                seen.add(i)
        assert seen == set(ref), mode
