"""What the report shows of a stored stack: cut-planes, stripe power, a few slices.

The planes and stripe power come from the table of lines each step writes
with its result (:mod:`pystack3d_dask.kernels.views`), so only the chunks of
the few whole slices shown are read; a result written before the table
existed is read once, chunk by chunk.  Reads run on the calling thread
(dask's synchronous scheduler, given as the function itself so that no
``distributed`` client is looked for: they never compete for the run's
workers or cluster), so memory is one chunk plus the planes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
from dask.local import get_sync

from pystack3d_dask.kernels.views import split_lines, view_lines
from pystack3d_dask.lazy import lazy_module

da = lazy_module("dask.array")


@dataclasses.dataclass(frozen=True)
class Views:
    """Cut-planes through the centre of a ``(z, y, x)`` stack, and its most curtained slice."""

    shape: tuple[int, int, int]
    #: slice ``z // 2``
    xy: np.ndarray
    #: row ``y // 2`` of every slice, ``(z, x)``
    xz: np.ndarray
    #: column ``x // 2`` of every slice, ``(z, y)``
    yz: np.ndarray
    #: stripe power of every slice (see :func:`pystack3d_dask.quality.stripe_power`)
    stripes: np.ndarray
    #: whole slices by index: the most curtained one and those asked for
    slices: dict[int, np.ndarray]

    @property
    def most_striped(self) -> int:
        """Index of the slice with the highest stripe power."""
        return _most_striped(self.stripes)


def _most_striped(stripes: np.ndarray) -> int:
    return int(np.nanargmax(stripes)) if np.isfinite(stripes).any() else stripes.size // 2


def read_views(stack: da.Array, *, lines: da.Array | np.ndarray | None = None, slices: Iterable[int] = ()) -> Views:
    """The :class:`Views` of ``stack``: from its lines table if given, else from one pass over it.

    Parameters
    ----------
    stack : dask array (z, y, x)
        Chunked by whole slices (a stored step result).
    lines : array (z, x + y + 1), optional
        ``stack``'s :func:`~pystack3d_dask.kernels.views.view_lines`, stored
        with it: only the chunks of the kept slices are then read.  Without it
        (a result written before the table existed) every chunk is read once.
    slices : iterable of int
        Indices of extra whole slices to keep (out-of-range ones are ignored).
    """
    nz, ny, nx = stack.shape
    if lines is None:
        lines = np.concatenate([view_lines(np.asarray(block.compute(scheduler=get_sync))) for block in stack.blocks])
    elif isinstance(lines, da.Array):
        lines = lines.compute(scheduler=get_sync)
    xz, yz, stripes = split_lines(lines, (nz, ny, nx))
    wanted = sorted({k for k in slices if 0 <= k < nz} | {nz // 2, _most_striped(stripes)})
    kept = dict(zip(wanted, np.asarray(stack[wanted].compute(scheduler=get_sync))))  # each chunk read once
    return Views(shape=(nz, ny, nx), xy=kept[nz // 2], xz=xz, yz=yz, stripes=stripes, slices=kept)
