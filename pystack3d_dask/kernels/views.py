"""What the report draws of a stack, per slice: its centre row and column, and its stripe power.

:func:`view_lines` runs in the task that writes each chunk of a step's result
(:func:`pystack3d_dask.store.prepare_block`), on the chunk already in memory,
and its table is stored beside the result.  The report then reads a table of
``x + y + 1`` values per slice, and the chunks of two or three whole slices,
instead of reading the whole result again for every step: that second pass
cost 0.3-0.5 s of CPU per step at 60 x 1024² (reading and checking the bytes;
the lines themselves cost 0.6 ms per 1024² slice).
"""

from __future__ import annotations

import numpy as np

from pystack3d_dask.kernels.dtype import fill_nonfinite
from pystack3d_dask.quality import stripe_power


def view_lines(block: np.ndarray) -> np.ndarray:
    """Row ``y // 2``, column ``x // 2`` and stripe power of each slice of a ``(z, y, x)`` block.

    Parameters
    ----------
    block : ndarray (z, y, x)
        Whole slices, any real dtype.

    Returns
    -------
    lines : float32 ndarray (z, x + y + 1)
        ``[:, :x]`` the rows, ``[:, x:x + y]`` the columns (non-finite pixels
        kept), ``[:, -1]`` the stripe power (see
        :func:`pystack3d_dask.quality.stripe_power`; non-finite pixels count as
        their slice's mean, so it is always finite).  float32 holds every value
        of an 8- or 16-bit or float32 stack exactly; wider values are rounded,
        which no figure can show.
    """
    if block.ndim != 3 or 0 in block.shape[1:]:
        raise ValueError(f"block of shape {block.shape} is invalid: expected (z, y, x) slices with y, x > 0.")
    nz, ny, nx = block.shape
    stripes = stripe_power(fill_nonfinite(block) if block.dtype.kind == "f" else block)
    return np.concatenate([block[:, ny // 2], block[:, :, nx // 2], np.reshape(stripes, (nz, 1))],
                          axis=1, dtype=np.float32)


def split_lines(lines: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``(z, x)`` rows, ``(z, y)`` columns and ``(z,)`` stripe power of a :func:`view_lines` table.

    ``shape`` is the ``(z, y, x)`` shape of the stack the table was computed from.
    """
    nz, ny, nx = shape
    if lines.shape != (nz, nx + ny + 1):
        raise ValueError(f"a table of shape {lines.shape} is invalid for a stack of shape {shape}: "
                         f"expected {(nz, nx + ny + 1)}.")
    return lines[:, :nx], lines[:, nx : nx + ny], lines[:, -1]
