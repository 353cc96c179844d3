"""A small pool of persistent worker processes with a hard per-item time limit.

Why not `concurrent.futures` or `multiprocessing.Pool`: neither can abandon one stuck task. A future that
runs past its limit keeps its worker busy forever (a sympy evaluation of 9^9^9^9^9 never returns), and
signal-based limits (math-verify's own) only work in the main thread of the main interpreter. Here each
worker owns a pipe; the parent hands out one item at a time, waits with a deadline, and kills and replaces a
worker that misses it. That works from any thread of the parent.

Workers are plain `python -c` subprocesses, not `multiprocessing` children: spawn and forkserver children
re-import the user's `__main__`, which re-runs a training script that lacks an `if __name__ == "__main__"`
guard, and fork would copy the CUDA and thread state of a training process. Each worker reports "ready"
after its imports, so import time never counts against an item's limit.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait

TIMEOUT = "timeout"  # result of an item that ran past its limit
ERROR = "error"  # result of an item whose function raised or whose worker died
_READY = "ready"
STARTUP_TIMEOUT_S = 120.0


def _worker_main() -> None:
    """Entry point of a worker: `python -c '...; _worker_main()' module:function [module:init]`."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it kills us
    # The protocol owns the original stdout; stray prints from libraries go to stderr instead.
    conn_in, conn_out = Connection(os.dup(0), writable=False), Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    fn, *init = (_resolve(name) for name in sys.argv[1:])
    for init_fn in init:
        init_fn()
    conn_out.send(_READY)
    while True:
        try:
            item = conn_in.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        try:
            result = fn(*item)
        except Exception:  # the parent counts it; one bad item must not take the worker down
            result = ERROR
        conn_out.send(result)


def _resolve(name: str):
    module_name, fn_name = name.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


# The worker registers bare `gvpo` and `gvpo.rewards` package objects, so that importing this module and
# the graders skips the package __init__ files (which import torch: 1+ s and hundreds of MB per worker).
_BOOTSTRAP = """import sys, types
for name, path in {packages!r}.items():
    sys.modules[name] = module = types.ModuleType(name)
    module.__path__ = [path]
from gvpo.rewards.workers import _worker_main
_worker_main()
"""


class _Worker:
    def __init__(self, target: str, init: str | None):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        here = os.path.dirname(os.path.abspath(__file__))
        code = _BOOTSTRAP.format(packages={"gvpo": os.path.dirname(here), "gvpo.rewards": here})
        argv = [sys.executable, "-c", code, target, *([init] if init else [])]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.send_conn = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.recv_conn = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.ready = False
        self.started = time.monotonic()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.send_conn.close()
        self.recv_conn.close()


class WorkerPool:
    """Run `target(*item)` for each item in worker processes, each item under `timeout_s` seconds.

    `target` is "module:function", importable in a fresh interpreter; `init` ("module:function", no
    arguments) runs once in each worker before it reports ready: imports and warm-up go there.
    `map` is thread-safe: calls from several threads are served one after the other.
    Counters: `timeouts`, `errors`, `restarts`.
    """

    def __init__(self, target: str, num_workers: int, init: str | None = None):
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}: must be >= 1")
        self.target, self.init, self.num_workers = target, init, num_workers
        self.pid = os.getpid()  # a forked child must not use its parent's pipes
        self._lock = threading.Lock()
        self._workers = [_Worker(target, init) for _ in range(num_workers)]
        self.timeouts = self.errors = self.restarts = 0

    def _replace(self, worker: _Worker) -> _Worker:
        worker.stop()
        self.restarts += 1
        new = _Worker(self.target, self.init)
        self._workers[self._workers.index(worker)] = new
        return new

    def map(self, items: list[tuple], timeout_s: float) -> list:
        """Results in item order; TIMEOUT or ERROR in place of an item that missed its limit or failed."""
        with self._lock:
            if not self._workers:
                raise RuntimeError("WorkerPool.map after close(): create a new pool")
            return self._map(items, timeout_s)

    def _map(self, items: list[tuple], timeout_s: float) -> list:
        results: list = [None] * len(items)
        pending = deque(enumerate(items))
        idle = [w for w in self._workers if w.ready]
        busy: dict = {}  # recv_conn -> (worker, item index, deadline)
        while pending or busy:
            while idle and pending:
                worker = idle.pop()
                index, item = pending.popleft()
                try:
                    worker.send_conn.send(item)
                except OSError:  # died while idle (killed from outside): replace it, retry the item
                    pending.appendleft((index, item))
                    self._replace(worker)
                    continue
                busy[worker.recv_conn] = (worker, index, time.monotonic() + timeout_s)
            starting = {w.recv_conn: w for w in self._workers if not w.ready}
            deadlines = [d for _, _, d in busy.values()]
            deadlines += [w.started + STARTUP_TIMEOUT_S for w in starting.values()]
            wait_s = max(0.0, min(deadlines) - time.monotonic())
            for conn in wait(list(busy) + list(starting), timeout=wait_s):
                if conn in starting:
                    idle.append(self._on_started(starting[conn]))
                    continue
                worker, index, _ = busy.pop(conn)
                try:
                    results[index] = conn.recv()
                except (EOFError, OSError):  # the worker died mid-item (e.g. out of memory)
                    results[index] = ERROR
                    self._replace(worker)
                else:
                    idle.append(worker)
                if isinstance(results[index], str) and results[index] == ERROR:
                    self.errors += 1
            now = time.monotonic()
            for conn, (worker, index, deadline) in list(busy.items()):
                if deadline <= now:
                    del busy[conn]
                    results[index] = TIMEOUT
                    self.timeouts += 1
                    self._replace(worker)
            for worker in starting.values():
                if not worker.ready and worker.started + STARTUP_TIMEOUT_S <= now:
                    raise RuntimeError(f"a worker for {self.target} did not start in {STARTUP_TIMEOUT_S:.0f} s")
        return results

    def _on_started(self, worker: _Worker) -> _Worker:
        try:
            message = worker.recv_conn.recv()
        except (EOFError, OSError):
            message = None
        if message != _READY:
            raise RuntimeError(
                f"a worker for {self.target} exited at start-up (its traceback is above, on stderr); "
                f"check that `python -c 'import {self.target.split(':')[0]}'` works in this environment"
            )
        worker.ready = True
        return worker

    def close(self) -> None:
        with self._lock:
            for worker in self._workers:
                worker.stop()
            self._workers = []
