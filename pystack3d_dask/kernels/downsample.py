"""Block-mean downsampling of a stack (the pyramid levels of an OME-Zarr export)."""

from __future__ import annotations

import math

import numpy as np

#: integer accumulators, smallest first
_ACCUMULATORS = {"u": (np.uint16, np.uint32, np.uint64), "i": (np.int16, np.int32, np.int64)}


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
        Shape ``block.shape[i] // factors[i]``, dtype of ``block``; integer means are rounded
        half up (exactly: the sums are integers), float means keep NaN.

    Raises
    ------
    ValueError
        ``factors`` does not give one integer >= 1 per axis.

    Examples
    --------
    >>> mean_downsample(np.array([[0, 2, 4, 7]], np.uint8), factors=(1, 2))
    array([[1, 6]], dtype=uint8)
    """
    if len(factors) != block.ndim or any(int(f) != f or f < 1 for f in factors):
        raise ValueError(f"factors = {factors!r} is invalid: expected {block.ndim} integers >= 1.")
    out_shape = tuple(n // f for n, f in zip(block.shape, factors))
    count = math.prod(factors)
    if block.dtype.kind in "ui":
        info = np.iinfo(block.dtype)
        acc = next(t for t in _ACCUMULATORS[block.dtype.kind]
                   if np.iinfo(t).max >= count * info.max and np.iinfo(t).min <= count * info.min)
    else:
        acc = np.float64 if block.dtype.itemsize > 4 else np.float32
    # Sum of the strided sub-arrays, one per offset in the box: a few streaming passes, where a
    # mean over the axes of a reshaped view is 20x slower.
    total = np.zeros(out_shape, acc)
    for offset in np.ndindex(*factors):
        total += block[tuple(slice(o, o + n * f, f) for o, n, f in zip(offset, out_shape, factors))]
    if block.dtype.kind in "ui":
        total += count // 2
        total //= count
    else:
        total *= 1 / count
    return total.astype(block.dtype, copy=False)
