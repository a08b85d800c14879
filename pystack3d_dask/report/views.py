"""What the report shows of a stored stack, read in one pass: cut-planes, stripe power, a few slices.

The pass reads one chunk at a time on the calling thread (dask's synchronous
scheduler, given as the function itself so that no ``distributed`` client is
looked for: it never competes for the run's workers or cluster), so its
memory is one chunk plus the planes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
from dask.local import get_sync

from pystack3d_dask.lazy import lazy_module
from pystack3d_dask.quality import stripe_power

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
        return int(np.nanargmax(self.stripes)) if np.isfinite(self.stripes).any() else self.shape[0] // 2


def _fill_nonfinite(block: np.ndarray) -> np.ndarray:
    """Non-finite pixels (NaN borders of a registered float stack) set to their slice's mean."""
    finite = np.isfinite(block)
    if finite.all():
        return block
    count = np.maximum(finite.sum(axis=(1, 2), keepdims=True), 1)
    mean = np.where(finite, block, 0).sum(axis=(1, 2), keepdims=True) / count
    return np.where(finite, block, mean)


def read_views(stack: da.Array, *, slices: Iterable[int] = ()) -> Views:
    """Read ``stack`` once, chunk by chunk, and return its :class:`Views`.

    Parameters
    ----------
    stack : dask array (z, y, x)
        Chunked by whole slices (a stored step result).
    slices : iterable of int
        Indices of extra whole slices to keep (out-of-range ones are ignored).
    """
    nz, ny, nx = stack.shape
    wanted = {k for k in slices if 0 <= k < nz} | {nz // 2}
    xz, yz, stripes, kept = [], [], [], {}
    start = 0
    for block in stack.blocks:
        data = np.asarray(block.compute(scheduler=get_sync))
        xz.append(data[:, ny // 2].copy())
        yz.append(data[:, :, nx // 2].copy())
        stripes.append(stripe_power(_fill_nonfinite(data) if data.dtype.kind == "f" else data))
        for k in wanted:
            if start <= k < start + data.shape[0]:
                kept[k] = data[k - start].copy()
        start += data.shape[0]
    stripes = np.concatenate(stripes)
    views = Views(shape=(nz, ny, nx), xy=kept[nz // 2], xz=np.concatenate(xz), yz=np.concatenate(yz),
                  stripes=stripes, slices=kept)
    worst = views.most_striped
    if worst not in kept:
        kept[worst] = np.asarray(stack[worst].compute(scheduler=get_sync))
    return views
