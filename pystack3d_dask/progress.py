"""Run a list of write tasks on the active scheduler with a progress bar in slices/s.

Tasks run through a bounded window, in chunk order: at most a few chunks per
worker are in flight at any time, so memory stays ``workers x chunk x a small
factor`` whatever the number of slices (a single ``dask.compute`` of every
task lets the reads run ahead of the writes and hold many chunks at once).
A task that writes a shard of k chunks counts for k, but two are always in
flight, so that one shard's write overlaps the next one's computation.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import dask
from dask.callbacks import Callback
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from dask.optimization import cull

from pystack3d_dask.errors import WorkersLost

#: chunks in flight per worker thread
WINDOW_PER_WORKER = 2
#: write tasks in flight at least, however many chunks each one gathers
MIN_WINDOW = 2


def _window(threads: int, chunks_per_task: int) -> int:
    return max(MIN_WINDOW, -(-WINDOW_PER_WORKER * threads // chunks_per_task))


class _SliceCounter(Callback):
    """Advances a tqdm bar by the slice count each write task returns (threaded scheduler)."""

    def __init__(self, keys: set, bar):
        super().__init__()
        self._keys, self._bar = keys, bar

    def _posttask(self, key, result, dsk, state, worker_id):
        if key in self._keys:
            self._bar.update(result)


class _TaskBar(Callback):
    """A tqdm bar over the tasks of a local dask computation (a step's global state)."""

    def __init__(self, desc: str):
        super().__init__()
        self._desc, self._bar = desc, None

    def _start_state(self, dsk, state):
        from tqdm.auto import tqdm

        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self._bar = tqdm(total=total, desc=self._desc, unit="task", file=sys.stderr, dynamic_ncols=True)

    def _posttask(self, key, result, dsk, state, worker_id):
        self._bar.update(1)

    def _finish(self, dsk, state, errored):
        self._bar.close()


def state_progress(desc: str, *, quiet: bool, distributed: bool):
    """Context showing the progress of a step's global-state computation (local schedulers)."""
    return contextlib.nullcontext() if quiet or distributed else _TaskBar(desc)


def execute(tasks: Sequence[Delayed], *, total: int, desc: str, distributed: bool, quiet: bool = False,
            unit: str = "chunk", chunks_per_task: int = 1) -> None:
    """Compute ``tasks`` (each returns the number of slices it wrote), showing progress.

    ``unit``: what a task writes, for messages ("chunk", "shard"); ``chunks_per_task``: the
    chunks it gathers (a shard's), which sizes the window.

    On a ``distributed`` client the tasks are submitted as futures and counted
    as they finish; on the local schedulers a dask callback counts them.  The
    first task error is raised as is (it names the file or slice at fault).
    """
    from tqdm.auto import tqdm

    if not tasks:
        return
    tasks = _own_graphs(tasks)
    with tqdm(total=total, desc=desc, unit="slice", disable=quiet, file=sys.stderr, leave=True,
              dynamic_ncols=True) as bar:
        if distributed:
            _execute_distributed(tasks, bar, desc=desc, unit=unit, chunks_per_task=chunks_per_task)
            return
        # Our own pool, so that on an error we can wait for the tasks still running: nothing
        # may write into the store after we return (the caller may roll the step back).
        workers = dask.config.get("num_workers", None) or os.cpu_count()
        pool = ThreadPoolExecutor(workers)
        window = _window(workers, chunks_per_task)
        try:
            with _SliceCounter({t.key for t in tasks}, bar):
                for i in range(0, len(tasks), window):
                    dask.compute(*tasks[i : i + window], pool=pool)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _own_graphs(tasks: Sequence[Delayed]) -> list[Delayed]:
    """``tasks``, each holding only the part of their graph that it needs.

    The write tasks of a step share one graph (the whole step's): computing a
    window of them made dask cull that whole graph each time, quadratic in the
    chunks (0.25 s per window at 10 000 chunks).  Culled here once per task, a
    window costs what its own tasks cost.
    """
    graph = HighLevelGraph.merge(*(t.__dask_graph__() for t in tasks)).to_dict()
    return [Delayed(t.key, cull(graph, t.key)[0]) for t in tasks]


def _execute_distributed(tasks: Sequence[Delayed], bar, *, desc: str, unit: str, chunks_per_task: int,
                         drain_timeout: float = 60.0) -> None:
    from distributed import as_completed, get_client

    from pystack3d_dask.cluster import PLANNED_THREADS

    client = get_client()
    planned = dask.config.get(PLANNED_THREADS, 0)

    def window() -> int:
        # Sized on the threads the cluster may have, not only those up now: adaptive scaling
        # starts jobs for the work it sees queued, and jobs come and go.
        return _window(max(1, planned, sum(client.nthreads().values())), chunks_per_task)

    pending = list(tasks)
    # Only the writes in flight are held: a finished write's future is released at once, or
    # a worker that leaves (walltime, scancel) would take its results with it and the
    # scheduler would run those writes again (each new job redoing every write before it).
    running, completed = set(), as_completed()

    def fill_window() -> None:
        size = window()
        while pending and len(running) < size:
            future = client.compute(pending.pop(0))
            running.add(future)
            completed.add(future)

    written = 0
    try:
        fill_window()
        for future in completed:
            bar.update(future.result())
            written += 1
            running.discard(future)
            future.release()
            fill_window()
    except WorkersLost as exc:
        client.cancel(list(running))
        raise exc.during(f"{written} of {len(tasks)} {unit}s of {desc} written") from None
    except Exception:
        client.cancel(list(running))
        # The caller rolls the step back, and a cancelled task already running on a worker
        # still finishes: wait until none of ours is processing, so nothing writes after we return.
        keys = {f.key for f in running}
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline:
            busy = {k for ks in client.processing().values() for k in ks}
            if not busy & keys:
                break
            time.sleep(0.05)
        raise
    except BaseException:
        # An interruption keeps what is written (each chunk is written atomically): no need to wait.
        client.cancel(list(running))
        raise
