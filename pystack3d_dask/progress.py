"""Run a list of write tasks on the active scheduler with a progress bar in slices/s."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import dask
from dask.callbacks import Callback
from dask.delayed import Delayed


class _SliceCounter(Callback):
    """Advances a tqdm bar by the slice count each write task returns (threaded scheduler)."""

    def __init__(self, keys: set, bar):
        super().__init__()
        self._keys, self._bar = keys, bar

    def _posttask(self, key, result, dsk, state, worker_id):
        if key in self._keys:
            self._bar.update(result)


def execute(tasks: Sequence[Delayed], *, total: int, desc: str, distributed: bool, quiet: bool = False) -> None:
    """Compute ``tasks`` (each returns the number of slices it wrote), showing progress.

    On a ``distributed`` client the tasks are submitted as futures and counted
    as they finish; on the local schedulers a dask callback counts them.  The
    first task error is raised as is (it names the file or slice at fault).
    """
    from tqdm.auto import tqdm

    if not tasks:
        return
    with tqdm(total=total, desc=desc, unit="slice", disable=quiet, file=sys.stderr, leave=True,
              dynamic_ncols=True) as bar:
        if distributed:
            from distributed import as_completed, get_client

            futures = get_client().compute(list(tasks))
            try:
                for future in as_completed(futures):
                    bar.update(future.result())
            finally:
                for f in futures:
                    f.cancel()
            return
        with _SliceCounter({t.key for t in tasks}, bar):
            dask.compute(*tasks)
