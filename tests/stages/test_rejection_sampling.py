"""Rejection sampling: each filter on hand-made responses, the SFT records and summary they give, and the
job end to end on a tiny random checkpoint (filters relaxed so that its gibberish passes), whose output
``stage=sft`` trains on; two data-parallel ranks split the prompts and rank 0 writes everything."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from generation_utils import job_args, make_checkpoint, make_prompt_data, run_job

from r1mega.config.load import compose_config
from r1mega.config.schema import RejectionConfig
from r1mega.data.prompts import Prompt, load_prompts
from r1mega.data.sft import parse_sft_record, read_sft_jsonl
from r1mega.loop import train
from r1mega.parallel.bootstrap import single_process
from r1mega.rewards import RewardBreakdown
from r1mega.rollout import Completion
from r1mega.stages.rejection_sampling import (
    REJECT_REASONS,
    Candidate,
    PromptOutcome,
    filter_candidates,
    run_rejection_sampling,
    sft_record,
    split_completion,
    summarize_outcomes,
)

GOOD = "Add 2 and 2 to get 4.\n</think>\n\nThe sum is \\boxed{4}."


def cand(
    index: int,
    text: str = GOOD,
    tokens: int = 10,
    finish: str = "eos",
    accuracy: float = 1.0,
    language: float = 1.0,
    total: float | None = None,
) -> Candidate:
    values = {"accuracy": accuracy, "format": 1.0, "language": language}
    completion = Completion([1, 2], [7] * tokens, [0.0] * tokens, text, finish)
    return Candidate(index, completion, RewardBreakdown(values, sum(values.values()) if total is None else total))


def reasons(candidates: list[Candidate], **overrides) -> tuple[list[int], dict[str, int]]:
    kept, rejected = filter_candidates(candidates, RejectionConfig(**overrides), forbidden=("<｜User｜>",))
    return [c.index for c in kept], dict(rejected)


def test_each_filter_rejects_for_its_own_reason() -> None:
    candidates = [
        cand(0),
        cand(1, finish="length"),
        cand(2, text="Add.\n</think>\n\n<｜User｜> \\boxed{4}"),
        cand(3, text="Add 2 and 2 without ever closing the think block"),
        cand(4, text="Other reasoning.\n</think>\n\n\\boxed{5}", accuracy=0.0),
        cand(5, text="Mixed reasoning.\n</think>\n\n\\boxed{4}", language=0.5),
        cand(6, text="Short.\n</think>\n\n\\boxed{4}", tokens=2),
        cand(7, text="Long.\n</think>\n\n\\boxed{4}", tokens=50),
        cand(8, text="Add 2 and 2 to get 4.\n</think>\n\nSo: \\boxed{4}"),  # the same reasoning as 0
    ]
    kept, rejected = reasons(candidates, min_response_tokens=3, max_response_tokens=40)
    assert kept == [0]
    assert rejected == {"truncated": 1, "special_tokens": 1, "format": 1, "incorrect": 1, "language": 1,
                        "too_short": 1, "too_long": 1, "duplicate": 1}  # fmt: skip
    assert set(rejected) <= set(REJECT_REASONS)


def test_switches_turn_filters_off() -> None:
    candidates = [
        cand(0, text="never closed", finish="length", accuracy=0.0, language=0.2),
        cand(1, text="never closed", finish="length", accuracy=0.0, language=0.2),
    ]
    relaxed = dict(require_format=False, require_correct=False, min_language_share=0.0)
    assert reasons(candidates, **relaxed) == ([0], {"duplicate": 1})
    assert reasons(candidates, **relaxed, dedupe=False) == ([0, 1], {})
    # special tokens never pass: they would forge chat turns in the SFT set
    assert reasons([cand(0, text="a <｜User｜> b")], **relaxed) == ([], {"special_tokens": 1})


def test_max_per_prompt_keeps_the_best_then_shortest_then_first() -> None:
    candidates = [
        cand(0, text="a\n</think>\n\n\\boxed{4}", total=2.0, tokens=30),
        cand(1, text="b\n</think>\n\n\\boxed{4}", total=3.0, tokens=30),
        cand(2, text="c\n</think>\n\n\\boxed{4}", total=3.0, tokens=20),
        cand(3, text="d\n</think>\n\n\\boxed{4}", total=3.0, tokens=20),
    ]
    assert reasons(candidates, max_per_prompt=1) == ([2], {"surplus": 3})
    assert reasons(candidates, max_per_prompt=3) == ([1, 2, 3], {"surplus": 1})
    assert reasons(candidates, max_per_prompt=0) == ([0, 1, 2, 3], {})


def test_split_completion_and_the_sft_record() -> None:
    assert split_completion(GOOD) == ("Add 2 and 2 to get 4.", "The sum is \\boxed{4}.")
    assert split_completion("  still thinking  ") == ("still thinking", "")
    assert split_completion("<think>\nr\n</think>\n\nanswer", prefix_in_prompt=False) == ("r", "answer")
    prompt = Prompt("chain_sum-7", "What is 2 + 2?", "4", "chain_sum")
    record = sft_record(prompt, cand(3), {"checkpoint": "/ckpt", "model": "m"})
    example = parse_sft_record(json.loads(json.dumps(record)), "x")  # the SFT reader accepts it as is
    assert example.id == "chain_sum-7-rs3"
    assert example.messages == [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "The sum is \\boxed{4}.", "reasoning": "Add 2 and 2 to get 4."},
    ]
    source = example.meta["provenance"]
    assert example.meta["task"] == "chain_sum" and example.meta["answer"] == "4"
    assert source["checkpoint"] == "/ckpt" and source["prompt_id"] == "chain_sum-7" and source["sample_index"] == 3
    assert source["rewards"] == {"accuracy": 1.0, "format": 1.0, "language": 1.0} and source["reward_total"] == 3.0


def test_summary_counts_per_task_and_filter() -> None:
    outcomes = [
        PromptOutcome(0, "a", samples=4, correct=3, generated_tokens=40, records=[{}, {}], rejected={"incorrect": 1, "duplicate": 1}),
        PromptOutcome(1, "a", samples=4, correct=0, generated_tokens=40, records=[], rejected={"incorrect": 4}),
        PromptOutcome(2, "b", samples=4, correct=1, generated_tokens=40, records=[{}], rejected={"truncated": 3}),
    ]  # fmt: skip
    s = summarize_outcomes(outcomes)
    assert (s["prompts"], s["samples"], s["kept"], s["prompts_with_kept"]) == (3, 12, 3, 2)
    assert s["kept_fraction"] == pytest.approx(3 / 12) and s["accuracy"] == pytest.approx(4 / 12)
    assert s["rejected"] == {r: {"incorrect": 5, "duplicate": 1, "truncated": 3}.get(r, 0) for r in REJECT_REASONS}
    assert s["tasks"]["a"] == {"prompts": 2, "samples": 8, "kept": 2, "kept_fraction": 0.25,
                               "prompts_with_kept": 1, "accuracy": 3 / 8}  # fmt: skip
    assert s["tasks"]["b"]["kept_fraction"] == pytest.approx(1 / 4)


# ---- end to end on a tiny random checkpoint ---------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rejection")
    return make_prompt_data(root / "data"), make_checkpoint(root / "ckpt")


RELAXED = [
    "rejection.require_correct=false",
    "rejection.require_format=false",
    "rejection.min_language_share=0",
    "rejection.max_prompts=6",
    "rejection.samples_per_prompt=2",
    "rejection.max_new_tokens=12",
    "rejection.batch_size=4",
]


def run_in_process(overrides: list[str]) -> dict:
    cfg = compose_config(overrides)
    with single_process(cfg) as ctx:
        return run_rejection_sampling(cfg, ctx)


def test_end_to_end_writes_an_sft_set_that_sft_trains_on(setup, tmp_path) -> None:
    data, ckpt = setup
    out = tmp_path / "rs"
    summary = run_in_process([*job_args(data, ckpt), *RELAXED, f"rejection.output_dir={out}", f"run_dir={tmp_path}"])
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (summary["prompts"], summary["samples"]) == (6, 12)
    assert summary["kept"] + sum(summary["rejected"].values()) == 12
    assert summary["kept"] >= 8, summary["rejected"]  # only special tokens or exact duplicates are dropped
    assert summary["checkpoint"] == str(ckpt) and summary["config"]["samples_per_prompt"] == 2
    assert sum(t["samples"] for t in summary["tasks"].values()) == 12

    examples, skipped = read_sft_jsonl(out / "train.jsonl")
    assert skipped == 0 and len(examples) == summary["kept"]
    prompts = {p.id: p for p in load_prompts(str(data / "train.jsonl"))[:6]}
    for ex in examples:
        source = ex.meta["provenance"]
        assert ex.id == f"{source['prompt_id']}-rs{source['sample_index']}"
        assert source["checkpoint"] == str(ckpt) and source["model"] == "qwen2_tiny"
        assert set(source["rewards"]) >= {"accuracy", "format", "language"}
        assert 1 <= source["response_tokens"] <= 12
        assert ex.messages[0]["content"] == prompts[source["prompt_id"]].prompt
        assert ex.meta["answer"] == prompts[source["prompt_id"]].answer
    order = [(list(prompts).index(ex.meta["provenance"]["prompt_id"]), ex.meta["provenance"]["sample_index"]) for ex in examples]  # fmt: skip
    assert order == sorted(order)  # prompt-file order, then sample order

    sft = [
        "stage=sft",
        "model=qwen2_tiny",
        "data=cold_start",
        f"data.train_path={out / 'train.jsonl'}",
        "data.eval_path=null",
        f"data.tokenizer={data / 'tokenizer'}",
        "data.packing=false",
        "data.seq_length=256",
        f"checkpoint.load={ckpt}",
        "optim.train_steps=2",
        "optim.lr_warmup_steps=0",
        "optim.micro_batch_size=2",
        "optim.global_batch_size=4",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        f"run_dir={tmp_path / 'sft'}",
    ]
    cfg = compose_config(sft)
    with single_process(cfg) as ctx:
        result = train(cfg, ctx)
    assert result.step == 2 and all(math.isfinite(m["lm_loss"]) for m in result.history)


def test_strict_filters_keep_nothing_from_a_random_model(setup, tmp_path) -> None:
    """Defaults: a random model never closes its think block within 8 tokens, so every response is cut."""
    data, ckpt = setup
    overrides = [*job_args(data, ckpt), "rejection.max_prompts=2", "rejection.max_new_tokens=8", f"run_dir={tmp_path}"]
    summary = run_in_process(overrides)
    assert summary["kept"] == 0 and summary["rejected"]["truncated"] == summary["samples"] == 8
    assert (tmp_path / "rejection_sampling" / "train.jsonl").read_text() == ""


@pytest.mark.slow
def test_two_data_parallel_ranks_split_prompts_and_rank0_writes(setup, tmp_path) -> None:
    data, ckpt = setup
    args = [
        *job_args(data, ckpt),
        *RELAXED,
        "rejection.max_prompts=5",
        "rejection.batch_size=2",
        "parallel.world_size=null",
    ]
    logs = run_job("r1mega.cli.rejection_sample", args, tmp_path, ranks=2)
    assert all(log.startswith("[rc=0]") for log in logs), logs[0][-3000:] + logs[1][-3000:]
    summary = json.loads((tmp_path / "rejection_sampling" / "summary.json").read_text())
    assert (summary["prompts"], summary["samples"]) == (5, 10)
    records = [json.loads(line) for line in (tmp_path / "rejection_sampling" / "train.jsonl").read_text().splitlines()]
    assert len(records) == summary["kept"]
    first = [p.id for p in load_prompts(str(data / "train.jsonl"))[:5]]
    assert {r["meta"]["provenance"]["prompt_id"] for r in records} <= set(first)
    assert not list(tmp_path.glob("rejection_sampling/*.tmp"))


@pytest.mark.slow
def test_pipeline_parallel_writes_what_one_process_writes(setup, tmp_path) -> None:
    """PP=2 (2 processes): pipelined sampling (two row groups in flight) gives the samples of one process that
    decodes the same two groups in turn, so the same SFT set is written."""
    data, ckpt = setup
    args = [*job_args(data, ckpt), *RELAXED, "rejection.max_prompts=3", "parallel.world_size=null"]
    single_args = [*args, "grpo.rollout_row_groups=2", f"rejection.output_dir={tmp_path / 'single'}"]
    run_in_process([*single_args, f"run_dir={tmp_path}"])
    pp2_args = [*args, "parallel=pp2", f"rejection.output_dir={tmp_path / 'pp2'}"]
    logs = run_job("r1mega.cli.rejection_sample", pp2_args, tmp_path, ranks=2)
    assert all(log.startswith("[rc=0]") for log in logs), logs[0][-3000:] + logs[1][-3000:]
    assert (tmp_path / "pp2" / "train.jsonl").read_text() == (tmp_path / "single" / "train.jsonl").read_text()
    single, pp2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("single", "pp2"))
    assert pp2["kept"] == single["kept"] and pp2["rejected"] == single["rejected"] and pp2["samples"] == 6
