"""Intensity rescaling kernels: pure numpy, one block at a time.

Histogram matching (``intensity_rescaling``) and the per-slice area means and
factors of ``intensity_rescaling_area`` (:func:`area_sums`, :func:`scale`).

The data model of histogram matching, defined once here:

Bins
    ``edges = numpy.linspace(lo, hi, nbins + 1)`` in float64.  Bin ``i`` holds the
    values ``edges[i] <= v < edges[i + 1]``; the last bin also holds ``v == hi``.
    Values outside ``[lo, hi]`` and NaN are not counted.  This is
    :func:`numpy.histogram`'s rule for ``bins=nbins, range=(lo, hi)``, bit for bit.
CDF
    A histogram ``h`` defines a piecewise-linear cumulative distribution with
    knots ``(edges[i], c[i])``, ``c[0] = 0`` and ``c[i] = sum(h[:i]) / sum(h)``:
    the pixels of a bin are taken as spread evenly across it.
Matching
    A pixel value ``v`` of a slice with knots ``c_s``, matched onto a reference
    with knots ``c_r``, becomes ``c_r^-1(c_s(v))``:

    * ``p = c_s(v)``, linear between the knots (0 below ``lo``, 1 above ``hi``);
    * ``k`` = first knot with ``c_r[k] > p`` (``c_r[k] = 1`` when ``p = 1``), so
      that ``c_r[k - 1] <= p < c_r[k]``; output = ``edges[k - 1] + (p - c_r[k - 1]) /
      (c_r[k] - c_r[k - 1]) * (edges[k] - edges[k - 1])``.

    Empty reference bins are flat stretches of ``c_r``: the inverse steps over
    them.  ``p = 0`` maps to the left edge of the reference's first non-empty
    bin and ``p = 1`` to the right edge of its last one, so values outside
    ``[lo, hi]`` are clamped into the reference's occupied range.  A slice
    matched onto its own histogram is returned unchanged (to rounding).
"""

from __future__ import annotations

import numpy as np


def bin_edges(lo: float, hi: float, nbins: int) -> np.ndarray:
    """Return the ``nbins + 1`` float64 edges of ``nbins`` equal bins over ``[lo, hi]``.

    Identical to the edges :func:`numpy.histogram` builds for ``range=(lo, hi)``.
    """
    return np.linspace(np.float64(lo), np.float64(hi), int(nbins) + 1)


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Return the bin of each value (``intp``), ``-1`` for values outside the edges or NaN.

    Parameters
    ----------
    values : ndarray
        Any real values; computed in float64.
    edges : ndarray, shape (nbins + 1,)
        Equally spaced increasing edges (see :func:`bin_edges`).

    Notes
    -----
    The index is computed arithmetically then corrected against the edges
    themselves, so a value lying exactly on an edge goes to the bin that edge
    opens, as with :func:`numpy.histogram`.
    """
    v = np.asarray(values, dtype=np.float64)
    n = len(edges) - 1
    lo, hi = edges[0], edges[-1]
    inside = (v >= lo) & (v <= hi)  # False for NaN
    idx = np.zeros(v.shape, np.intp)
    vi = v[inside]
    k = ((vi - lo) * (n / (hi - lo))).astype(np.intp)
    k[k >= n] = n - 1
    k[vi < edges[k]] -= 1
    k[(vi >= edges[k + 1]) & (k != n - 1)] += 1
    idx[inside] = k
    idx[~inside] = -1
    return idx


#: pixels handled at a time: temporaries stay in cache (2-3x faster than whole 1024^2 slices)
_PIECE = 1 << 16


def _pieces(n: int):
    return (slice(i, min(i + _PIECE, n)) for i in range(0, n, _PIECE))


def _value_table(image: np.ndarray) -> tuple[int, int] | None:
    """``(first, last)`` values of a table indexed by the pixel values of an integer image.

    ``first`` is 0 for unsigned images (the raw values index the table) and
    the minimum otherwise.  None for floats, and when the table would be
    larger than the image: then going pixel by pixel is cheaper.
    """
    if image.dtype.kind not in "ui" or image.size == 0:
        return None
    first = 0 if _raw_index(image.dtype) else int(image.min())
    last = int(image.max())
    return (first, last) if last - first < image.size else None


def _raw_index(dtype: np.dtype) -> bool:
    # unsigned values below 2**63 index numpy arrays as they are, without a converted copy
    return dtype.kind == "u" and dtype.itemsize < 8


def _indices(piece: np.ndarray, first: int) -> np.ndarray:
    return piece if _raw_index(piece.dtype) else piece.astype(np.intp) - first


def _counts(image: np.ndarray, first: int, last: int) -> np.ndarray:
    """Number of pixels equal to each value ``first .. last`` of an integer image.

    ``first`` must be 0 for the unsigned dtypes whose raw values index arrays
    (as :func:`_value_table` gives it).
    """
    flat = image.ravel()
    out = np.zeros(last - first + 1, np.int64)
    for s in _pieces(flat.size):
        out += np.bincount(_indices(flat[s], first), minlength=out.size)
    return out


def _map_values(image: np.ndarray, func) -> np.ndarray:
    """``func`` (float64 values -> float64) on every pixel of ``image``, as float32.

    Integer images go through a table of ``func`` on their distinct values:
    the same arithmetic, evaluated once per value instead of once per pixel.
    """
    flat = image.ravel()
    out = np.empty(flat.size, np.float32)
    table = _value_table(image)
    if table is not None:
        first, last = table
        lut = func(np.arange(first, last + 1, dtype=np.float64)).astype(np.float32)
        for s in _pieces(flat.size):
            np.take(lut, _indices(flat[s], first), out=out[s], mode="clip")  # indices are in range
    else:
        for s in _pieces(flat.size):
            out[s] = func(flat[s].astype(np.float64))
    return out.reshape(image.shape)


def rebin(counts: np.ndarray, values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Histogram of data given as counts of exact values: ``counts[..., j]`` pixels equal ``values[j]``.

    Parameters
    ----------
    counts : ndarray, shape (..., nvalues)
        Integer counts.
    values : ndarray, shape (nvalues,)
        The values counted, in increasing order.
    edges : ndarray, shape (nbins + 1,)
        Bin edges.

    Returns
    -------
    ndarray of int64, shape (..., nbins)
        The same as :func:`histograms` on the pixels themselves (same bin of each value).
    """
    idx = bin_index(values, edges)
    keep = idx >= 0
    bins = idx[keep]  # non-decreasing, as the values are sorted: each bin is one run of columns
    out = np.zeros(np.shape(counts)[:-1] + (len(edges) - 1,), np.int64)
    if bins.size:
        starts = np.flatnonzero(np.r_[True, bins[1:] != bins[:-1]])
        kept = np.asarray(counts)[..., keep].astype(np.int64)
        out[..., bins[starts]] = np.add.reduceat(kept, starts, axis=-1)
    return out


def histograms(block: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Per-slice histograms of a ``(z, y, x)`` block over ``edges``.

    Parameters
    ----------
    block : ndarray, shape (z, y, x)
        Any real dtype.
    edges : ndarray, shape (nbins + 1,)
        Equally spaced bin edges (see the module docstring for the bin rule).

    Returns
    -------
    ndarray of int64, shape (z, nbins)
        Pixel counts; values outside the edges and NaN are not counted.

    Examples
    --------
    >>> import numpy as np
    >>> histograms(np.array([[[0, 1, 1, 3]]], np.uint8), bin_edges(0, 3, 3))
    array([[1, 2, 1]])
    """
    nbins = len(edges) - 1
    out = np.zeros((block.shape[0], nbins), np.int64)
    for k, image in enumerate(block):
        table = _value_table(image)
        if table is not None:  # integers: count each value, then bin the distinct values
            out[k] = rebin(_counts(image, *table), np.arange(table[0], table[1] + 1), edges)
            continue
        flat = image.ravel()
        for s in _pieces(flat.size):
            idx = bin_index(flat[s], edges)
            out[k] += np.bincount(idx[idx >= 0], minlength=nbins)
    return out


def value_counts(block: np.ndarray) -> np.ndarray:
    """Per-slice counts of every value of a one-byte integer dtype, shape ``(z, 256)``.

    Column ``j`` counts the pixels equal to ``iinfo(dtype).min + j``: an exact,
    small summary from which any histogram of the block follows (:func:`rebin`).
    """
    info = np.iinfo(block.dtype)
    if info.bits != 8:
        raise TypeError(f"value_counts needs a one-byte integer dtype, got {block.dtype}")
    return np.stack([_counts(image, info.min, info.max) for image in block]).reshape(-1, 256)


def cdf_knots(hist: np.ndarray) -> np.ndarray:
    """Knots ``c`` of the piecewise-linear CDF of each histogram (last axis), shape ``(..., nbins + 1)``.

    ``c[..., 0] = 0`` and ``c[..., -1] = 1`` exactly.  An empty histogram gives NaN.
    """
    hist = np.asarray(hist, dtype=np.float64)
    cum = np.concatenate([np.zeros(hist.shape[:-1] + (1,)), np.cumsum(hist, axis=-1)], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return cum / cum[..., -1:]


def running_mean(hists: np.ndarray, size: int) -> np.ndarray:
    """Mean of the histograms over a window of ``size`` slices centred on each slice.

    Slice ``k`` averages slices ``k - (size - 1) // 2`` to ``k + size // 2``
    (``size`` slices; one more after than before when ``size`` is even), the
    window clipped to the stack: end slices average fewer slices.

    Parameters
    ----------
    hists : ndarray, shape (nz, nbins)
        Integer per-slice histograms.
    size : int
        Window length, >= 1.

    Returns
    -------
    ndarray of float64, shape (nz, nbins)
    """
    hists = np.asarray(hists, dtype=np.int64)
    nz = hists.shape[0]
    cum = np.concatenate([np.zeros((1,) + hists.shape[1:], np.int64), np.cumsum(hists, axis=0)])
    k = np.arange(nz)
    first = np.clip(k - (size - 1) // 2, 0, nz)
    last = np.clip(k + size // 2 + 1, 0, nz)  # exclusive
    # integer sums, then one division: exact and independent of the order of the slices
    return (cum[last] - cum[first]) / (last - first)[:, None]


def match_values(values: np.ndarray, edges: np.ndarray, cdf_src: np.ndarray, cdf_ref: np.ndarray) -> np.ndarray:
    """Map ``values`` through ``c_ref^-1(c_src(v))`` (see the module docstring), in float64.

    Parameters
    ----------
    values : ndarray
        Pixel values of one slice.
    edges : ndarray, shape (nbins + 1,)
        Bin edges.
    cdf_src, cdf_ref : ndarray, shape (nbins + 1,)
        CDF knots (:func:`cdf_knots`) of the slice and of its reference.

    Returns
    -------
    ndarray of float64, same shape as ``values`` (NaN stays NaN).
    """
    p = np.interp(np.asarray(values, dtype=np.float64), edges, cdf_src)
    last = int(np.searchsorted(cdf_ref, 1.0, side="left"))  # c_ref[last] == 1 first: right edge of the last full bin
    k = np.clip(np.searchsorted(cdf_ref, p, side="right"), 1, last)
    c0, c1 = cdf_ref[k - 1], cdf_ref[k]
    e0, e1 = edges[k - 1], edges[k]
    return e0 + (p - c0) / (c1 - c0) * (e1 - e0)


def match(block: np.ndarray, edges: np.ndarray, cdf_src: np.ndarray, cdf_ref: np.ndarray) -> np.ndarray:
    """Histogram-match each slice of a ``(z, y, x)`` block onto its reference; float32.

    Parameters
    ----------
    block : ndarray, shape (z, y, x)
        Input slices, any real dtype.
    edges : ndarray, shape (nbins + 1,)
        Bin edges.
    cdf_src, cdf_ref : ndarray, shape (z, nbins + 1)
        CDF knots of each slice and of its reference.

    Returns
    -------
    ndarray of float32, shape (z, y, x)

    Notes
    -----
    Integer slices are mapped through a table of their distinct values (the
    same float64 arithmetic), so the result does not depend on the path taken.
    """
    out = np.empty(block.shape, np.float32)
    for k, image in enumerate(block):
        out[k] = _map_values(image, lambda v: match_values(v, edges, cdf_src[k], cdf_ref[k]))  # noqa: B023
    return out


def area_sums(
    block: np.ndarray, *, threshold_min: float | None = None, threshold_max: float | None = None
) -> np.ndarray:
    """Per-slice ``(sum, count)`` of the pixels within ``[threshold_min, threshold_max]``.

    Parameters
    ----------
    block : ndarray, shape (z, y, x)
        The area of each slice (already cropped).
    threshold_min, threshold_max : float, optional
        Inclusive bounds; None means unbounded.  NaN pixels never count.

    Returns
    -------
    ndarray of float64, shape (z, 2)
        Sums (exact for integer data) and pixel counts; a slice's mean is ``sum / count``.
    """
    out = np.zeros((block.shape[0], 2))
    for k, image in enumerate(block):
        table = _value_table(image)
        if table is not None:  # integers: exact sums from the counts of each value
            counts = _counts(image, *table)
            values = np.arange(table[0], table[1] + 1)
            keep = _within(values, threshold_min, threshold_max)
            out[k] = (counts[keep] * values[keep]).sum(), counts[keep].sum()
            continue
        flat = image.ravel()
        for s in _pieces(flat.size):  # fixed order of the partial sums: same result for any chunking
            values = flat[s][_within(flat[s], threshold_min, threshold_max)]
            out[k] += values.sum(dtype=np.float64), values.size
    return out


def _within(values: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    keep = ~np.isnan(values) if values.dtype.kind == "f" else np.ones(values.shape, bool)
    if lo is not None:
        keep &= values >= lo
    if hi is not None:
        keep &= values <= hi
    return keep


def scale(block: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Multiply slice ``k`` of a ``(z, y, x)`` block by ``factors[k]`` (in float64); float32.

    ``factors`` may be ``(z,)`` or ``(z, 1)``.
    """
    out = np.empty(block.shape, np.float32)
    for k, f in enumerate(np.asarray(factors, np.float64).reshape(-1)):
        out[k] = _map_values(block[k], lambda v: v * f)  # noqa: B023
    return out
