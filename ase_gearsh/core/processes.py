"""Worker processes that never outlive their parent, and SIGTERM treated like Ctrl-C.

* :func:`worker_init` (a ``multiprocessing.Pool`` initializer): the worker ignores
  Ctrl-C (the parent decides), turns SIGTERM into ``SystemExit`` so that its own
  clean-up runs, and terminates itself when the parent dies, even by ``kill -9``
  (``PR_SET_PDEATHSIG`` on Linux, plus a watchdog thread everywhere).
* :func:`interrupt_on_sigterm`: in the parent, SIGTERM raises ``KeyboardInterrupt``
  so that one code path cleans up after both.
* :func:`run_pool`: map a function over tasks in worker processes, yielding results
  as they finish; on any exit (error, Ctrl-C, SIGTERM) the workers are terminated
  and joined before the exception propagates.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

# BLAS/OpenMP threads of each worker process (unless the user set the variables)
WORKER_THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

__all__ = [
    "WORKER_THREADS",
    "usable_cores",
    "worker_thread",
    "worker_init",
    "interrupt_on_sigterm",
    "run_pool",
    "Interrupted",
    "environment",
    "interrupted",
]

# set by the SIGTERM handler of worker processes (worker_init)
_INTERRUPTED = threading.Event()


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the system reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_POOLS: dict[str, ThreadPoolExecutor] = {}


def worker_thread(name: str) -> ThreadPoolExecutor:
    """The process's single-thread executor called ``name`` (e.g. the calculator's S
    worker), created on first use.  A child made by ``fork`` starts without them: the
    parent's threads do not exist there, and an executor copied from the parent would
    queue work that no thread takes."""
    pool = _POOLS.get(name)
    if pool is None:
        pool = _POOLS[name] = ThreadPoolExecutor(1, thread_name_prefix=name)
    return pool


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOLS.clear)


def interrupted() -> bool:
    """True once this worker process was told to stop (SIGTERM from the parent or its
    death).  The interrupt may surface as another exception (a SystemExit raised while
    an extension module initialises becomes ``ImportError: initialization failed``), so
    error handlers check this before recording a failure."""
    return _INTERRUPTED.is_set()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM; ``signum`` says which (for the exit status 128 + signum)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _exit_on_sigterm(signum, frame):
    _INTERRUPTED.set()
    raise SystemExit(128 + signum)


def _watch_parent(parent: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10 * interval)  # clean-up time, then no mercy
            os._exit(128 + signal.SIGTERM)


def worker_init(interval: float = 1.0) -> None:
    """Pool initializer: ignore SIGINT, SIGTERM -> SystemExit, die with the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    parent = os.getppid()
    if parent == 1:  # the parent died before we got here
        os._exit(128 + signal.SIGTERM)
    threading.Thread(target=_watch_parent, args=(parent, interval), daemon=True).start()


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM and SIGINT raise
    :class:`Interrupted`; the previous handlers are restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def environment(values: dict) -> Iterator[None]:
    """Environment variables not set by the user set to ``values`` inside the block
    (inherited by processes started there), removed again afterwards."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def run_pool(
    function: Callable, tasks: Iterable, jobs: int, environment_values: dict | None = None
) -> Iterator:
    """``function(task)`` for every task in ``jobs`` spawned worker processes (see
    :func:`worker_init`), yielded in completion order.  ``function`` should catch its
    own ordinary exceptions and return them as results.  ``environment_values``: variables
    set for the workers only (see :func:`environment`)."""
    import multiprocessing as mp

    with environment(environment_values or {}):
        pool = mp.get_context("spawn").Pool(jobs, initializer=worker_init)
    try:
        yield from pool.imap_unordered(function, tasks)
    except BaseException:
        pool.terminate()  # SIGTERM: each worker cleans up, then exits
        raise
    else:
        pool.close()
    finally:
        pool.join()
