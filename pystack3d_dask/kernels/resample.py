"""Linear resampling along z: the output grid, the bracketing slices, the interpolation.

Input positions ``zin`` are strictly increasing (see :mod:`pystack3d_dask.io.zpos`).
Output slice ``j`` at ``zout[j]`` is

    ``(1 - w[j]) * stack[lower[j]] + w[j] * stack[upper[j]]``

with ``zin[lower[j]] <= zout[j] <= zin[upper[j]]`` and ``upper[j] <= lower[j] + 1``.
An output position that falls on an input slice (to within ``RTOL`` times the
z range, so ``3 * 0.01`` meets a file's ``0.03``) copies that slice exactly and
needs no neighbour.
"""

from __future__ import annotations

import numpy as np

#: positions closer than RTOL x (max z - min z) are taken as equal
RTOL = 1e-9


def output_dtype(dtype: np.dtype | str) -> np.dtype:
    """Float dtype of the interpolated slices: float32, or float64 where float32 cannot hold the input."""
    return np.result_type(np.dtype(dtype), np.float32)


def uniform_grid(zmin: float, zmax: float, dz: float, *, rtol: float = RTOL) -> np.ndarray:
    """Positions ``zmin, zmin + dz, ...`` up to ``zmax``, **including** ``zmax`` when it falls on the grid.

    Parameters
    ----------
    zmin, zmax : float
        Range of the input positions, ``zmin <= zmax``.
    dz : float
        Spacing, > 0.
    rtol : float
        A last position within ``rtol * (zmax - zmin)`` of ``zmax`` counts as on
        the grid (``numpy.arange`` would drop it to rounding error).

    Returns
    -------
    numpy.ndarray
        float64 positions, none past ``zmax``.

    Examples
    --------
    >>> uniform_grid(0.0, 0.03, 0.01)
    array([0.  , 0.01, 0.02, 0.03])
    """
    tol = rtol * (zmax - zmin)
    count = int(np.floor((zmax - zmin + tol) / dz)) + 1
    z = zmin + np.arange(count) * dz
    return np.minimum(z, zmax)


def brackets(
    zin: np.ndarray, zout: np.ndarray, *, rtol: float = RTOL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Input slices around each output position and the interpolation weight.

    Parameters
    ----------
    zin : numpy.ndarray
        Input positions, strictly increasing.
    zout : numpy.ndarray
        Output positions, all within ``[zin[0], zin[-1]]`` (to ``rtol``).
    rtol : float
        Relative tolerance of equal positions, see :data:`RTOL`.

    Returns
    -------
    lower, upper : numpy.ndarray of int
        Input slice indices bracketing each output position; equal where the
        position falls on an input slice.
    weight : numpy.ndarray of float64
        Weight of ``upper`` in ``[0, 1]``.
    """
    zin = np.asarray(zin, dtype=np.float64)
    zout = np.asarray(zout, dtype=np.float64)
    tol = rtol * (zin[-1] - zin[0])
    last = len(zin) - 1
    lower = np.clip(np.searchsorted(zin, zout, side="right") - 1, 0, last)
    upper = np.minimum(lower + 1, last)
    gap = zin[upper] - zin[lower]
    weight = np.divide(zout - zin[lower], gap, out=np.zeros_like(zout), where=gap > 0)
    weight = np.clip(weight, 0.0, 1.0)
    weight[zout - zin[lower] <= tol] = 0.0
    weight[(gap > 0) & (zin[upper] - zout <= tol)] = 1.0
    upper = np.where(weight == 0.0, lower, upper)
    lower = np.where(weight == 1.0, upper, lower)
    return lower, upper, weight


def interpolate(stack: np.ndarray, lower: np.ndarray, upper: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Output slice ``i`` = ``(1 - w_i) * stack[lower_i] + w_i * stack[upper_i]``.

    Computed one output slice at a time in slice-sized buffers (no gathered
    copies of the input, no chunk-sized temporaries).

    Parameters
    ----------
    stack : numpy.ndarray, shape (n, y, x)
        The input slices the output needs.
    lower, upper : numpy.ndarray of int, shape (k,)
        Indices in ``stack`` of the two slices around each output slice.
    weight : numpy.ndarray, shape (k,)
        Weight of ``upper``; 0 returns ``stack[lower]`` and 1 ``stack[upper]`` exactly.

    Returns
    -------
    numpy.ndarray
        Shape ``(k, y, x)``, dtype :func:`output_dtype` of the input.
    """
    dtype = output_dtype(stack.dtype)
    out = np.empty((len(weight),) + stack.shape[1:], dtype)
    above = np.empty(stack.shape[1:], dtype)
    for i, (lo, up, w) in enumerate(zip(lower, upper, weight)):
        w = dtype.type(w)
        np.multiply(stack[lo], dtype.type(1) - w, out=out[i], dtype=dtype)
        np.multiply(stack[up], w, out=above, dtype=dtype)
        out[i] += above
    return out
