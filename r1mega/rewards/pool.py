"""A pool of verifier worker processes that hostile answers cannot hang, crash or slow.

Each job gets ``time_limit_s`` of wall time from the moment it is handed to a worker. Inside the worker a
timer interrupts Python-level work at the limit (the worker reports a timeout and lives on); a job stuck in C
code that never returns to the interpreter (one huge big-integer operation) is killed ``kill_grace_s`` later
and its worker replaced; a worker that crashes (segfault, memory limit) is replaced too. A failed job scores 0
with its status. Jobs run concurrently on ``num_workers`` processes, so a batch takes at most about
``ceil(jobs / num_workers) * (time_limit_s + kill_grace_s)`` plus a few milliseconds per job.

Workers come from a ``forkserver`` (default) or ``spawn`` context, never ``fork``, so the calling process
may hold threads (a torch.distributed rank, a CUDA context). With forkserver, math-verify is imported and
warmed once in the fork server (``r1mega.rewards.preload``) and a replacement worker starts in
milliseconds; that preload is set for the process's one fork server, so it applies only if this pool is the
first user of it. Workers ignore SIGINT, die with their parent (Linux), and may be given an address-space
limit. Functions sent to the pool must be importable module-level functions (or partials of them).

Not thread-safe: one thread at a time calls ``map``.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing as mp
import os
import signal
import sys
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from r1mega.utils.logging import get_logger

log = get_logger(__name__)

START_METHODS = ("forkserver", "spawn")
PRELOAD_MODULE = "r1mega.rewards.preload"
_MAX_START_FAILURES = 3


class PoolError(RuntimeError):
    """The verifier pool cannot work (workers fail to start, the pool is closed); the message says why."""


@dataclass(frozen=True)
class JobResult:
    """What one job of ``VerifierPool.map`` gave."""

    value: float
    """The function's value; 0.0 unless ``status`` is ok."""
    status: str
    """ok, timeout (over the time limit), error (it raised or returned a non-finite value) or crash."""
    elapsed_s: float
    """Wall time from hand-over to the result, as seen by the pool."""
    error: str | None = None
    """What went wrong, for error and crash."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _JobTimeout(BaseException):
    """Raised by the worker's timer; a BaseException so that library ``except Exception`` blocks let it pass."""


def _on_timer(signum: int, frame: Any) -> None:
    raise _JobTimeout


def _limit_worker(memory_mb: int | None) -> None:
    """Worker hardening: no SIGINT, die with the parent (Linux), no core dumps, optional memory cap."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _on_timer)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_mb is not None:
        limit = memory_mb * 2**20
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard if hard != resource.RLIM_INFINITY else limit))


def _run_job(fn: Callable[[Any], float], arg: Any, time_limit_s: float) -> tuple[str, float, str | None]:
    """Call ``fn(arg)`` under the worker timer: (status, value, error)."""
    try:
        signal.setitimer(signal.ITIMER_REAL, time_limit_s)
        try:
            value = float(fn(arg))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if not math.isfinite(value):
            return "error", 0.0, f"non-finite value {value}"
        return "ok", value, None
    except _JobTimeout:
        return "timeout", 0.0, None
    except MemoryError:
        return "error", 0.0, "MemoryError (over the worker memory limit)"
    except Exception as e:  # any failure of one job is that job's score, never the worker's end
        message = str(e) if type(e).__module__.startswith("r1mega") else ""
        return "error", 0.0, f"{type(e).__name__}: {message[:300]}".rstrip(": ")


def worker_main(conn: Connection, time_limit_s: float, memory_mb: int | None) -> None:
    """A worker: warm up, say ready, then run ``(job_id, fn, arg)`` messages until ``None`` or EOF."""
    _limit_worker(memory_mb)
    from r1mega.rewards.equivalence import warm_up

    warm_up()  # a no-op when the fork server has done it already
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        job_id, fn, arg = message
        status, value, error = _run_job(fn, arg, time_limit_s)
        conn.send((job_id, status, value, error))


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start processes without the caller's ``__main__``.

    multiprocessing re-runs the parent's main module in every spawned or forkserver child; for a trainer
    that is the whole entry point (torch, megatron-core: seconds and gigabytes per worker). Workers need
    nothing from it, so while a worker is being started ``__main__`` is a bare module with no file.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class _Worker:
    """The pool's handle on one worker process."""

    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process, self.conn = process, conn
        self.ready = False
        self.started = time.monotonic()
        self.job: int | None = None
        """Index (in the current ``map``) of the job it runs; None when idle."""
        self.token = -1
        """Pool-wide id of that job, so that a late result of an abandoned call is never misfiled."""
        self.job_start = 0.0

    def stop(self, kill: bool) -> None:
        if kill and self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=2.0)
        self.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            if w.job is None:
                w.conn.send(None)
        except OSError:
            pass
    for w in workers:
        w.stop(kill=w.job is not None)
    workers.clear()


class VerifierPool:
    """Worker processes that run ``fn(item)`` under a hard per-job time limit (see the module docstring).

    Use as a context manager, or call ``start`` and ``close``::

        with VerifierPool(num_workers=8, time_limit_s=1.0) as pool:
            results = pool.map(accuracy, samples)
    """

    def __init__(
        self,
        num_workers: int = 4,
        time_limit_s: float = 1.0,
        start_method: str = "forkserver",
        memory_limit_mb: int | None = 2048,
        kill_grace_s: float = 0.1,
        startup_timeout_s: float = 60.0,
    ) -> None:
        if num_workers < 1:
            raise PoolError(f"num_workers={num_workers}: a verifier pool needs at least one worker.")
        if time_limit_s <= 0:
            raise PoolError(f"time_limit_s={time_limit_s}: the per-job time limit must be positive.")
        if start_method not in START_METHODS:
            raise PoolError(f"start_method={start_method!r}: use one of {', '.join(START_METHODS)} (never fork).")
        self.num_workers = num_workers
        self.time_limit_s = time_limit_s
        self.memory_limit_mb = memory_limit_mb
        self.kill_grace_s = kill_grace_s
        self.startup_timeout_s = startup_timeout_s
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload([PRELOAD_MODULE])
        self._workers: list[_Worker] = []
        self._start_failures = 0
        self._next_token = 0
        self._closed = False
        self.replaced = 0
        """Workers killed or lost (and so replaced) so far."""
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def __enter__(self) -> VerifierPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers (for tests and diagnostics)."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def start(self) -> None:
        """Start the workers and wait until every one is warmed up and ready."""
        self._check_open()
        self._fill()
        while not all(w.ready for w in self._workers):
            self._poll(0.5, [])
            self._reap([])
            self._fill()

    def close(self) -> None:
        """Stop every worker (idle ones exit cleanly, busy ones are killed). Safe to call twice."""
        self._closed = True
        self._finalizer()

    def map(self, fn: Callable[[Any], float], items: Sequence[Any]) -> list[JobResult]:
        """``fn(item)`` for every item, in order; a job over the time limit, raising or crashing scores 0."""
        self._check_open()
        results: list[JobResult | None] = [None] * len(items)
        queue = deque(range(len(items)))
        try:
            while queue or any(w.job is not None for w in self._workers):
                self._fill()
                for w in self._workers:
                    if w.ready and w.job is None and queue:
                        self._send(w, queue, fn, items)
                deadlines = [
                    w.job_start + self.time_limit_s + self.kill_grace_s for w in self._workers if w.job is not None
                ]
                self._poll(max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.5, results)
                self._reap(results)
        except BaseException:
            for w in [w for w in self._workers if w.job is not None]:  # abandoned jobs: stop them now
                self._remove(w)
            raise
        self._fill()  # replacements start warming up now, not at the next call
        return [r for r in results if r is not None]

    def _check_open(self) -> None:
        if self._closed:
            raise PoolError("The verifier pool is closed: create a new one.")

    def _fill(self) -> None:
        """Start workers until there are ``num_workers``."""
        while len(self._workers) < self.num_workers:
            if self._start_failures >= _MAX_START_FAILURES:
                raise PoolError(
                    f"Verifier workers failed {self._start_failures} times before becoming ready; "
                    "check that math-verify imports (python -c 'import math_verify') and the memory limit."
                )
            parent, child = self._ctx.Pipe(duplex=True)
            process = self._ctx.Process(
                target=worker_main,
                args=(child, self.time_limit_s, self.memory_limit_mb),
                name="r1mega-verifier",
                daemon=True,
            )
            with _main_module_hidden():
                process.start()
            child.close()
            self._workers.append(_Worker(process, parent))

    def _send(self, w: _Worker, queue: deque, fn: Callable[[Any], float], items: Sequence[Any]) -> None:
        """Hand the next queued job to an idle worker; a worker found dead gives the job back to the queue."""
        index, token, start = queue.popleft(), self._next_token, time.monotonic()
        self._next_token += 1
        try:
            w.conn.send((token, fn, items[index]))
        except (OSError, EOFError):
            queue.appendleft(index)
            self._lost(w, [])
            return
        except Exception as e:
            queue.appendleft(index)
            raise PoolError(
                f"Cannot send job {index} to a verifier worker ({e}): use picklable, importable functions."
            ) from e
        w.job, w.token, w.job_start = index, token, start

    def _poll(self, timeout: float, results: list) -> None:
        """Wait up to ``timeout`` for messages or exits and handle them."""
        by_handle: dict[Any, _Worker] = {}
        for w in self._workers:
            by_handle[w.conn] = w
            by_handle[w.process.sentinel] = w
        for handle in wait(list(by_handle), timeout):
            w = by_handle[handle]
            if w not in self._workers:
                continue
            if handle is w.conn:
                self._receive(w, results)
            elif not w.conn.poll():
                self._lost(w, results)

    def _receive(self, w: _Worker, results: list) -> None:
        try:
            message = w.conn.recv()
        except (EOFError, OSError):
            self._lost(w, results)
            return
        if message[0] == "ready":
            w.ready = True
            self._start_failures = 0
            return
        token, status, value, error = message
        if w.job is not None and token == w.token:
            results[w.job] = JobResult(value, status, time.monotonic() - w.job_start, error)
            w.job = None

    def _lost(self, w: _Worker, results: list) -> None:
        """A worker died: its job (if any) crashed; it is removed and will be replaced."""
        if not w.ready:
            self._start_failures += 1
        self._remove(w)
        if w.job is not None:
            why = f"the worker died (exit code {w.process.exitcode})"
            results[w.job] = JobResult(0.0, "crash", time.monotonic() - w.job_start, why)
            w.job = None

    def _reap(self, results: list) -> None:
        """Kill workers whose job is past the limit (the job scores a timeout) or that never became ready."""
        now = time.monotonic()
        for w in list(self._workers):
            if not w.ready and now - w.started > self.startup_timeout_s:
                self._lost(w, results)
                continue
            if w.job is None or now < w.job_start + self.time_limit_s + self.kill_grace_s:
                continue
            if w.conn.poll():  # the result came in just in time
                self._receive(w, results)
                if w.job is None or w not in self._workers:
                    continue
            results[w.job] = JobResult(0.0, "timeout", now - w.job_start, None)
            w.job = None
            self._remove(w)

    def _remove(self, w: _Worker) -> None:
        self._workers.remove(w)
        w.stop(kill=True)
        self.replaced += 1
