"""Processes for the kernels that hold the GIL, beside dask's threaded scheduler.

pystackreg holds the GIL for a whole pair, and numpy's VSNR takes it for each
of its ~40 calls per band and iteration: two threads correct 1.2-1.6x as
many slices as one thread, two processes 1.6-1.8x (300 x 340 to 2048²,
``benchmarks/bench_vsnr.py --only workers``).  With the
threaded scheduler and ``nproc > 1``, :func:`kernel_pool` keeps a pool of
``nproc`` processes for the whole run (:func:`cluster.scheduler` opens it);
a task hands such a kernel to it with :func:`run` and waits, its thread
holding no GIL meanwhile, so that the scheduler's ``nproc`` threads keep
``nproc`` processes busy.  Under ``distributed`` the tasks already run in
worker processes and :func:`run` calls the kernel in place.

The pool starts on first use.  Its processes are forks of a fork server
(one fresh interpreter, started once per Python process, that imports numpy
and pystackreg once), never of this process: it runs threads (dask, zarr's
event loop) that a fork would copy mid-flight.  They ignore SIGINT (a Ctrl-C
reaches the whole process group; the run decides what stops) and are killed
when the run stops on an error or a signal, rather than waited for: one
VSNR task on a large slice lasts minutes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from pystack3d_dask.process_settings import pool_worker

T = TypeVar("T")

#: what the fork server imports once for the pool's workers: "__main__" as in Python's default list
#: (Python up to 3.12 skips it, CPython gh-126631: each worker imports the main script, as a
#: spawned one does); not this package, as the server may ignore the caller's sys.path (gh-117378)
#: and load another copy of it
PRELOAD = ["__main__", "numpy", "scipy.fft", "pystackreg", "threadpoolctl"]

#: the workers' heap (mmap and trim thresholds, bytes): blocks up to glibc's largest mmap threshold
#: come from the heap, which keeps what a task frees for the next one (a worker lives for the run).
#: With glibc's defaults each registration pair's buffers were given back and page-faulted in again:
#: 40 000 faults and +20 % CPU per 1024² pair, 3000 per 300 x 340 pair.
WORKER_HEAP = (32 * 2**20, 2**30)


def start_method() -> multiprocessing.context.BaseContext:
    """Where the pool's processes come from: a fork server where the platform has one, else spawn.

    Spawned workers each start an interpreter and import numpy and pystackreg
    (~0.25 s of CPU each).  The fork server, started on first use and kept
    while this process lives, imports them once; each worker is a fork of it
    (milliseconds).
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # read when the server starts; no effect once it runs
    return context


class KernelPool:
    """``nproc`` worker processes, started in the background when first asked for.

    :meth:`started` says whether one is ready: until then a caller may do the
    work itself (the fork server's start costs ~0.3 s).
    """

    def __init__(self, nproc: int):
        self.nproc = nproc
        self.executor = ProcessPoolExecutor(nproc, mp_context=start_method(), initializer=pool_worker,
                                            initargs=WORKER_HEAP)
        # each submit starts a worker, the first one waits for the fork server: from a thread, so
        # that the caller goes on meanwhile
        starter = ThreadPoolExecutor(1)
        self._starting: Future = starter.submit(lambda: [self.executor.submit(os.getpid) for _ in range(nproc)])
        starter.shutdown(wait=False)

    def started(self) -> bool:
        """True once a worker process answers."""
        return self._starting.done() and any(f.done() for f in self._starting.result())

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future:
        return self.executor.submit(fn, *args, **kwargs)

    def close(self, *, kill: bool) -> None:
        """Wait for the workers to finish their tasks, or (``kill``) stop them now."""
        wait([self._starting])  # every worker started: none is left to start after the kill
        if kill:
            # no public way before Python 3.14 (terminate_workers): the pool's own process list.
            # The pool then finds its workers dead, fails their tasks and closes its queues
            for process in list((getattr(self.executor, "_processes", None) or {}).values()):
                process.kill()
        self.executor.shutdown(wait=True, cancel_futures=True)


@dataclasses.dataclass
class _Slot:
    """The pool of a :func:`kernel_pool` block: its size, and the pool once started."""

    nproc: int
    pool: KernelPool | None = None


_lock = threading.Lock()
#: the innermost kernel_pool block's slot; None outside one, or in one of nproc 1
_active: _Slot | None = None


@contextlib.contextmanager
def kernel_pool(nproc: int) -> Iterator[None]:
    """Let :func:`run` and :func:`pool` use ``nproc`` worker processes while the block runs.

    The pool starts on first use and is closed on the way out: waited for on
    a normal exit, killed on an exception (an error, Ctrl-C, SIGTERM).
    """
    global _active
    with _lock:
        previous, _active = _active, (_Slot(nproc) if nproc > 1 else None)
        mine = _active
    ok = False
    try:
        yield
        ok = True
    finally:
        with _lock:
            _active = previous
        if mine is not None and mine.pool is not None:
            mine.pool.close(kill=not ok)


def pool() -> KernelPool | None:
    """The run's pool (started now if it was not), or None where tasks run in place."""
    with _lock:
        if _active is None:
            return None
        if _active.pool is None:
            _active.pool = KernelPool(_active.nproc)
        return _active.pool


def run(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, in a worker process of the run's pool when there is one.

    ``fn`` and its arguments are pickled: a module-level function of a light
    module (the worker imports it), arrays of a task's size.
    """
    p = pool()
    if p is None:
        return fn(*args, **kwargs)
    return p.submit(fn, *args, **kwargs).result()
