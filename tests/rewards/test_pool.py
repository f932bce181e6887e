"""The verifier pool: hostile answers score 0 within the limit, killed and crashed workers are replaced."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
from rewards import pool_jobs

from r1mega.rewards import PoolError, VerifierPool, clip_to_answer
from r1mega.rewards.accuracy import accuracy
from r1mega.rewards.registry import RewardInput

PWNED = Path("/tmp") / f"r1mega-pwned-{uuid.uuid4().hex}"

HOSTILE = {
    "tower": "9^{9^{9^9}}",
    "tower-2": "2^{2^{64}}",
    "tower-10": "10^{10^{10}}",
    "big-pow": "9999999999^{9999999999}",
    "factorial": "10000000!",
    "factorial-googol": "(10^{100})!",
    "binomial": "\\binom{10^{9}}{10^{5}}",
    "product": "\\prod_{k=1}^{10^{7}} k",
    "sum": "\\sum_{n=1}^{10^{12}} n",
    "huge-exponent": "1e999999",
    "one-megabyte": "9" * 1_000_000,
    "nested-braces": "{" * 100_000 + "7" + "}" * 100_000,
    "python": f"__import__('os').system('touch {PWNED}')",
    "python-subclasses": "().__class__.__bases__[0].__subclasses__()",
    "input": "\\input{/etc/passwd}",
    "tex-loop": "\\def\\x{\\x}\\x",
    "unicode-junk": "\u202e\u0301\ud800\ufffd\U0001f4a9" * 200,
    "nul-bytes": "\x00" * 500 + "\x00",
    "matrix": "\\begin{pmatrix}" + "1&" * 300 + "1\\end{pmatrix}",
}


def _boxed(answer: str, gold: str = "7") -> RewardInput:
    return RewardInput(prompt="q", completion=f"<think>\nr\n</think>\n\\boxed{{{answer}}}", answer=gold)


def test_map_keeps_order_and_values(pool: VerifierPool) -> None:
    results = pool.map(pool_jobs.double, [1.0, 2.0, 3.5])
    assert [r.value for r in results] == [2.0, 4.0, 7.0]
    assert all(r.ok and r.elapsed_s < pool.time_limit_s for r in results)
    assert pool.map(pool_jobs.double, []) == []


def test_hostile_batch_is_bounded_and_good_answers_still_score(pool: VerifierPool) -> None:
    good = [_boxed("7"), _boxed("\\frac{14}{2}"), _boxed("7.0"), _boxed("x = 7")]
    samples = [_boxed(h) for h in HOSTILE.values()] + good
    limit = pool.time_limit_s
    start = time.perf_counter()
    results = pool.map(accuracy, [clip_to_answer(s, 1000) for s in samples])
    elapsed = time.perf_counter() - start
    hostile, fine = results[: len(HOSTILE)], results[len(HOSTILE) :]
    assert [r.value for r in hostile] == [0.0] * len(HOSTILE), dict(zip(HOSTILE, hostile, strict=True))
    assert all(r.elapsed_s < limit + 0.6 for r in hostile), dict(zip(HOSTILE, hostile, strict=True))
    assert [r.value for r in fine] == [1.0] * len(good)
    assert elapsed < 2 * limit + 4.0, f"{elapsed:.2f} s for {len(samples)} samples"
    assert not PWNED.exists()
    assert len(pool.pids) == pool.num_workers
    # the pool is as fast as before afterwards
    assert [r.value for r in pool.map(accuracy, [clip_to_answer(s, 1000) for s in good])] == [1.0] * len(good)


def test_job_ignoring_the_timer_is_killed_and_replaced(pool: VerifierPool) -> None:
    before, replaced = set(pool.pids), pool.replaced
    start = time.perf_counter()
    results = pool.map(pool_jobs.sleep_ignoring_timer, [30.0])
    assert time.perf_counter() - start < pool.time_limit_s + 1.0
    assert results[0].status == "timeout" and results[0].value == 0.0
    assert pool.replaced == replaced + 1
    assert len(set(pool.pids) - before) <= 1
    assert [r.value for r in pool.map(pool_jobs.double, [1.0] * 8)] == [2.0] * 8
    assert len(pool.pids) == pool.num_workers


def test_slow_python_job_times_out_and_the_worker_lives(pool: VerifierPool) -> None:
    replaced = pool.replaced
    results = pool.map(pool_jobs.sleep_for, [30.0, 0.0])
    assert [r.status for r in results] == ["timeout", "ok"]
    assert pool.replaced == replaced  # the worker's own timer stopped it


@pytest.mark.parametrize(
    ("job", "status"),
    [
        (pool_jobs.exit_now, "crash"),
        (pool_jobs.segfault, "crash"),
        (pool_jobs.raise_error, "error"),
        (pool_jobs.not_a_number, "error"),
    ],
)
def test_failures_score_zero(pool: VerifierPool, job: object, status: str) -> None:
    results = pool.map(job, [3, 3])  # type: ignore[arg-type]
    assert [(r.status, r.value) for r in results] == [(status, 0.0)] * 2
    assert [r.value for r in pool.map(pool_jobs.double, [2.0])] == [4.0]


def test_memory_limit() -> None:
    with VerifierPool(num_workers=1, time_limit_s=5.0, memory_limit_mb=1024) as small:
        results = small.map(pool_jobs.allocate_mb, [2048, 1])
    assert results[0].status == "error" and "MemoryError" in (results[0].error or "")
    assert results[1].value == 2**20


def test_worker_killed_mid_batch_is_replaced(pool: VerifierPool) -> None:
    victim = pool.pids[0]
    killer = threading.Timer(0.3, os.kill, (victim, signal.SIGKILL))
    killer.start()
    results = pool.map(pool_jobs.sleep_for, [0.8] * pool.num_workers)
    killer.join()
    statuses = sorted(r.status for r in results)
    assert statuses == ["crash"] + ["ok"] * (pool.num_workers - 1)
    assert victim not in pool.pids
    assert [r.value for r in pool.map(pool_jobs.double, [1.0] * pool.num_workers)] == [2.0] * pool.num_workers
    assert len(pool.pids) == pool.num_workers


def test_context_manager_stops_its_workers() -> None:
    with VerifierPool(num_workers=2, time_limit_s=1.0) as p:
        pids = p.pids
        assert len(pids) == 2 and all(psutil.pid_exists(pid) for pid in pids)
        p.map(pool_jobs.double, [1.0])
    deadline = time.monotonic() + 5
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids):
        assert time.monotonic() < deadline, "workers outlived their pool"
        time.sleep(0.05)
    with pytest.raises(PoolError, match="closed"):
        p.map(pool_jobs.double, [1.0])


def test_spawn_start_method() -> None:
    with VerifierPool(num_workers=1, time_limit_s=2.0, start_method="spawn") as p:
        assert p.map(accuracy, [_boxed("\\frac{14}{2}")])[0].value == 1.0


def test_works_from_a_torch_distributed_rank(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with VerifierPool(num_workers=1, time_limit_s=2.0) as p:
            assert p.map(accuracy, [_boxed("7")])[0].value == 1.0
    finally:
        dist.destroy_process_group()


def test_bad_arguments_are_explained(pool: VerifierPool) -> None:
    with pytest.raises(PoolError, match="fork"):
        VerifierPool(start_method="fork")
    with pytest.raises(PoolError, match="at least one"):
        VerifierPool(num_workers=0)
    with pytest.raises(PoolError, match="picklable"):
        pool.map(lambda x: x, [1])
    assert [r.value for r in pool.map(pool_jobs.double, [1.0])] == [2.0]


def test_an_aborted_call_leaves_no_stale_results(pool: VerifierPool) -> None:
    with pytest.raises(PoolError, match="picklable"):
        pool.map(pool_jobs.sleep_for, [0.5, 0.5, lambda: 0])  # the third item cannot be sent
    assert [r.value for r in pool.map(pool_jobs.double, [1.0, 2.0, 3.0, 4.0, 5.0])] == [2.0, 4.0, 6.0, 8.0, 10.0]


def test_workers_that_never_start_are_reported() -> None:
    p = VerifierPool(num_workers=1, start_method="spawn", startup_timeout_s=0.01)
    try:
        with pytest.raises(PoolError, match="before becoming ready"):
            p.start()
    finally:
        p.close()
    assert p.pids == []
