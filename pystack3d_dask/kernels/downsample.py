"""Block-mean downsampling of a stack (the pyramid levels of an OME-Zarr export)."""

from __future__ import annotations

import math

import numpy as np

from pystack3d_dask.kernels.dtype import clip_cast


def mean_downsample(block: np.ndarray, *, factors: tuple[int, ...]) -> np.ndarray:
    """Average ``block`` over non-overlapping boxes of ``factors`` pixels, in its own dtype.

    Parameters
    ----------
    block : numpy.ndarray
        Any number of axes; each axis length should be a multiple of its factor (a remainder
        is dropped, as the last incomplete box has no full average).
    factors : tuple of int
        One integer factor >= 1 per axis of ``block``.

    Returns
    -------
    numpy.ndarray
        Shape ``block.shape[i] // factors[i]``, dtype of ``block`` (integers are rounded to
        the nearest value).

    Raises
    ------
    ValueError
        ``factors`` does not give one integer >= 1 per axis.

    Examples
    --------
    >>> mean_downsample(np.array([[0, 2, 4, 6]], np.uint8), factors=(1, 2))
    array([[1, 5]], dtype=uint8)
    """
    if len(factors) != block.ndim or any(int(f) != f or f < 1 for f in factors):
        raise ValueError(f"factors = {factors!r} is invalid: expected {block.ndim} integers >= 1.")
    out_shape = tuple(n // f for n, f in zip(block.shape, factors))
    # Sum of the strided sub-arrays, one per offset in the box: a few streaming passes, where a
    # mean over the axes of a reshaped view is 20x slower.  float32 sums of up to 2**24 / 65535
    # uint16 values are exact, and so is the division by a power of two.
    work = np.float32 if block.dtype.itemsize <= 2 or block.dtype == np.float32 else np.float64
    total = np.zeros(out_shape, work)
    for offset in np.ndindex(*factors):
        total += block[tuple(slice(o, o + n * f, f) for o, n, f in zip(offset, out_shape, factors))]
    total *= 1 / math.prod(factors)
    return clip_cast(total, block.dtype)
