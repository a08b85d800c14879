"""What the report shows of a stored stack: cut-planes, stripe power, a few slices.

The planes and stripe power come from the table of lines each step writes
with its result (:mod:`pystack3d_dask.kernels.views`), so only the few whole
slices shown are read; a result written before the table existed is read
once, chunk by chunk.  Reads go straight to the store, on the calling thread:
no dask graph, no scheduler, no ``distributed`` client looked for (they never
compete for the run's workers or cluster), and memory is one chunk plus the
planes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np

from pystack3d_dask.kernels.views import split_lines, view_lines


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


def read_views(stack: Any, *, lines: np.ndarray | None = None, slices: Iterable[int] = ()) -> Views:
    """The :class:`Views` of ``stack``: from its lines table if given, else from one pass over it.

    Parameters
    ----------
    stack : array-like (z, y, x)
        A stored step result (:meth:`Project.stored <pystack3d_dask.engine.Project.stored>`,
        or any Zarr array): ``shape``, ``chunks`` and ``stack[i:j]`` read into numpy.
    lines : ndarray (z, x + y + 1), optional
        ``stack``'s :func:`~pystack3d_dask.kernels.views.view_lines`, stored
        with it: only the kept slices are then read.  Without it (a result
        written before the table existed) every chunk is read once.
    slices : iterable of int
        Indices of extra whole slices to keep (out-of-range ones are ignored).
    """
    nz, ny, nx = stack.shape
    if lines is None:
        cz = stack.chunks[0]
        lines = np.concatenate([view_lines(np.asarray(stack[i : i + cz])) for i in range(0, nz, cz)])
    xz, yz, stripes = split_lines(lines, (nz, ny, nx))
    wanted = {k for k in slices if 0 <= k < nz} | {nz // 2, _most_striped(stripes)}
    kept = {k: np.asarray(stack[k]) for k in sorted(wanted)}
    return Views(shape=(nz, ny, nx), xy=kept[nz // 2], xz=xz, yz=yz, stripes=stripes, slices=kept)
