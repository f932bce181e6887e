"""Start test processes by forking a warm interpreter instead of a fresh one.

Every trainer, rank and CLI that a test starts used to pay for importing torch, megatron-core, transformers and
r1mega (about 5 s on these 2 cores, more than most of those runs compute). A *zygote*, one per pytest process,
imports them once and never runs anything else; each process a test asks for is ``fork()``ed from it, so it
starts with the imports done and nothing else shared: no torch op has run in the zygote (no thread pools,
no RNG draws, no parallel state), the child gets its own session, environment, working directory, argv,
``sys.path`` and stdout/stderr file, runs ``python -m MODULE`` or ``python SCRIPT`` as ``runpy`` does, and
exits the way an interpreter does (non-daemon threads joined, ``atexit`` handlers run).

``spawn`` returns a ``Popen``-like handle (``pid``, ``wait``, ``poll``, ``returncode``); the zygote reaps its
children and reports each exit status (negative for a signal, as ``Popen``). ``R1MEGA_TEST_FRESH=1`` makes
``spawn`` start fresh interpreters instead (to rule the zygote out when a test behaves oddly).
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

PRELOAD = (
    "torch",
    "torch.distributed",
    "megatron.core",
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.dist_checkpointing",
    "megatron.core.pipeline_parallel",
    "transformers",
    "hydra",
    "omegaconf",
    "r1mega.cli.train",
    "r1mega.cli.eval",
    "r1mega.cli.rejection_sample",
    "r1mega.loop",
    "r1mega.stages",
    "r1mega.eval.run",
)
"""Modules the zygote imports: what every trainer and rank imports first. Importing runs no torch op."""


_DEFAULT_FILTERS = (
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
)
"""CPython's default warning filters (no ``-W``, no dev mode), first match first."""


class ZygoteProcess:
    """A process forked by the zygote: ``pid``, ``wait(timeout)``, ``poll()``, ``returncode``, like ``Popen``."""

    def __init__(self, conn: socket.socket, args: Sequence[str]) -> None:
        self.args = list(args)
        self._conn = conn
        self._buffer = b""
        self.pid = int(self._read_line(None))
        self.returncode: int | None = None

    def _read_line(self, timeout: float | None) -> str:
        self._conn.settimeout(timeout)
        while b"\n" not in self._buffer:
            try:
                chunk = self._conn.recv(256)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            if not chunk:
                raise RuntimeError(f"the test zygote went away while running {self.args}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def wait(self, timeout: float | None = None) -> int:
        """The exit status (negative: killed by that signal); ``subprocess.TimeoutExpired`` past ``timeout``."""
        if self.returncode is None:
            self.returncode = int(self._read_line(timeout))
            self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(timeout=0.001)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Zygote:
    """The warm interpreter of this pytest process (started on first use, stopped at exit)."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="r1mega-zygote-")) / "socket"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(self.path), str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
            text=True,
        )
        ready = self.proc.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"the test zygote did not start (it said {ready!r})")
        atexit.register(self.stop)

    def stop(self) -> None:
        """End the zygote (its children run on in their own sessions until their tests kill them)."""
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()

    def spawn(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        cwd: str | os.PathLike,
        output: str | os.PathLike,
        errors: str | os.PathLike | None = None,
    ) -> ZygoteProcess:
        """Fork ``python argv...`` (``argv[0]`` is ``-m MODULE``'s ``-m`` or a script path) with its stdout
        appended to the file ``output`` and its stderr to ``errors`` (default: ``output`` too)."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(self.path))
        request = {
            "argv": list(argv),
            "env": env,
            "cwd": str(cwd),
            "output": str(output),
            "errors": str(errors or output),
        }
        conn.sendall(json.dumps(request).encode() + b"\n")
        return ZygoteProcess(conn, argv)


_zygote: Zygote | None = None
_lock = threading.Lock()


def spawn(
    argv: Sequence[str],
    env: dict[str, str] | None,
    output: str | os.PathLike,
    cwd: str | os.PathLike | None = None,
    errors: str | os.PathLike | None = None,
) -> ZygoteProcess | subprocess.Popen:
    """Start ``python *argv`` in its own session, stdout appended to ``output`` and stderr to ``errors`` (default
    ``output``): forked from this pytest process's zygote, or a fresh interpreter under ``R1MEGA_TEST_FRESH=1``."""
    global _zygote
    cwd = cwd or os.getcwd()
    env = dict(os.environ) if env is None else env
    if os.environ.get("R1MEGA_TEST_FRESH") == "1":
        with open(output, "a") as out, open(errors or output, "a") as err:
            return subprocess.Popen(
                [sys.executable, *argv], env=env, cwd=cwd, stdout=out, stderr=err, start_new_session=True
            )
    with _lock:
        if _zygote is None or _zygote.proc.poll() is not None:
            _zygote = Zygote()
        zygote = _zygote
    return zygote.spawn(argv, env, cwd, output, errors)


def run(
    argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300, cwd: str | os.PathLike | None = None
) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=...)`` through ``spawn``;
    past ``timeout`` the process is killed and ``subprocess.TimeoutExpired`` raised."""
    with tempfile.TemporaryDirectory(prefix="r1mega-run-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = spawn(argv, env, out, cwd=cwd, errors=err)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # and whatever it left in its session
            except (ProcessLookupError, PermissionError):
                pass
        return subprocess.CompletedProcess([sys.executable, *argv], code, out.read_text(), err.read_text())


# ---- the zygote itself (python tests/zygote.py SOCKET PARENT_PID) --------------------------------------------


def _run_child(request: dict) -> None:
    """In the forked child: become ``python *argv`` and exit as an interpreter does. Never returns."""
    import atexit as child_atexit
    import runpy
    import traceback
    import warnings

    code = 1
    try:
        os.setsid()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        out = os.open(request["output"], flags, 0o644)
        err = os.open(request["errors"], flags, 0o644) if request["errors"] != request["output"] else out
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for entry in reversed([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        warnings.resetwarnings()  # then Python's own defaults, as a fresh interpreter starts with them
        for action, category, module in reversed(_DEFAULT_FILTERS):
            warnings.filterwarnings(action, category=category, module=module)
        warnings.filterwarnings(
            "ignore", message=".*found in sys.modules after import of package", category=RuntimeWarning
        )
        if os.environ.get("PYTHONWARNINGS"):
            warnings.simplefilter(os.environ["PYTHONWARNINGS"].split(":")[0])  # type: ignore[arg-type]
        import torch

        if os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        argv = request["argv"]
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                sys.path.insert(0, os.getcwd())
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        threading._shutdown()  # type: ignore[attr-defined]  # join non-daemon threads, as interpreter exit does
        child_atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: S110  (a closed stream at exit is no reason to hang)
                pass
        os._exit(code)


def _serve(path: str, parent: int) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while os.getppid() == parent:
        for key, _ in selector.select(timeout=0.05):
            conn, _ = key.fileobj.accept()
            conn.settimeout(10)
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            if not data:
                conn.close()
                continue
            request = json.loads(data)
            pid = os.fork()
            if pid == 0:
                server.close()
                for other in children.values():
                    other.close()
                conn.close()
                _run_child(request)
            conn.sendall(f"{pid}\n".encode())
            children[pid] = conn
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                try:
                    conn.sendall(f"{code}\n".encode())
                except OSError:
                    pass
                conn.close()
    for pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
