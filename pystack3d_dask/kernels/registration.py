"""Registration matrices: pairwise calculation, quality, cumulation, corrections and safe crop.

Matrix convention (the one place it is written down)
----------------------------------------------------
A registration matrix ``M`` is a 3x3 homogeneous matrix acting on pixel
positions ``p = (x, y, 1)`` with ``x`` the column and ``y`` the row of the
**full image** (pixel centres at integers, origin at the top-left pixel).  It
maps a position of the output (reference) frame to the position sampled in the
moving image::

    out(p) = mov(M @ p)

This is pystackreg's convention for ``StackReg(...).register(ref, mov)``.

* Pairwise matrices ``M[k]`` register slice ``k`` onto slice ``k - 1``;
  ``M[0]`` is the identity.
* Cumulative matrices bring every slice into the frame of slice 0:
  ``C[0] = I`` and ``C[k] = M[k] @ C[k - 1]``, so that
  ``corrected_k(p) = slice_k(C[k] @ p)``.  (PyStack3D multiplies in the other
  order, ``C[k - 1] @ M[k]``, which is only right for pure translations.)
* When registration runs on an ``area`` or on blocks, the matrix found on the
  sub-image is moved to full-image coordinates (:func:`to_full_image`), so a
  rotation turns about the same point whatever the area.
* ``nb_blocks = (nx, ny)`` (blocks along x, then along y, as in PyStack3D)
  gives matrices of shape ``(nz, ny, nx, 3, 3)``: axis 1 is the block row,
  axis 2 the block column.  Each block's matrix is anchored at its block
  centre (:func:`block_centres`) for the piecewise warp of
  :mod:`pystack3d_dask.kernels.warp`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from pystack3d_dask.errors import StepError
from pystack3d_dask.kernels.phase_correlation import translation
from pystack3d_dask.kernels.warp import warp_affine

Transformation = Literal["TRANSLATION", "RIGID_BODY", "SCALED_ROTATION", "AFFINE"]
Method = Literal["stackreg", "phase_correlation"]

#: :func:`shift_outliers`: pairs per window, robust standard deviations and px allowed
OUTLIER_WINDOW, OUTLIER_MAD, OUTLIER_PX = 11, 5.0, 1.0

#: Smallest block side (px) that still registers reliably.
MIN_BLOCK_SIZE = 16


def block_edges(n: int, n_blocks: int) -> np.ndarray:
    """Return the ``n_blocks + 1`` pixel edges splitting ``n`` pixels into near-equal blocks."""
    return (np.arange(n_blocks + 1) * n) // n_blocks


def block_centres(n: int, n_blocks: int, *, offset: int = 0) -> np.ndarray:
    """Centres (pixel coordinates, float) of the blocks of :func:`block_edges`, shifted by ``offset``."""
    edges = block_edges(n, n_blocks)
    return offset + (edges[:-1] + edges[1:] - 1) / 2.0


def to_full_image(matrix: np.ndarray, x0: float, y0: float) -> np.ndarray:
    """Express a matrix found on a sub-image whose top-left pixel is ``(x0, y0)`` in full-image coordinates.

    With ``q = p - o`` the sub-image coordinates, ``out(p) = mov(o + M (p - o))``,
    i.e. ``T(o) @ M @ T(-o)``.
    """
    shift = np.eye(3)
    shift[:2, 2] = (x0, y0)
    unshift = np.eye(3)
    unshift[:2, 2] = (-x0, -y0)
    return shift @ matrix @ unshift


def register_pair(
    ref: np.ndarray,
    mov: np.ndarray,
    *,
    transformation: Transformation,
    method: Method = "stackreg",
    upsample_factor: int = 20,
) -> np.ndarray:
    """Return the 3x3 matrix ``M`` with ``mov(M p) ~ ref(p)``.

    Parameters
    ----------
    ref, mov : ndarray, shape (y, x)
        Reference and moving images.
    transformation : {"TRANSLATION", "RIGID_BODY", "SCALED_ROTATION", "AFFINE"}
        The model fitted.
    method : {"stackreg", "phase_correlation"}
        pystackreg's TurboReg fit (every model), or the FFT cross-correlation
        of :mod:`pystack3d_dask.kernels.phase_correlation` (TRANSLATION only).
    upsample_factor : int
        Sub-pixel grid of ``"phase_correlation"`` (1 / upsample_factor px).

    Returns
    -------
    ndarray, shape (3, 3)
        In the sub-image's own coordinates (see the module docstring).

    Raises
    ------
    ValueError
        ``"phase_correlation"`` with another model than TRANSLATION.
    """
    if method == "phase_correlation":
        if transformation != "TRANSLATION":
            raise ValueError(f"method 'phase_correlation' fits TRANSLATION only, not {transformation!r}")
        out = np.eye(3)
        out[:2, 2] = translation(ref, mov, upsample_factor=upsample_factor)
        return out
    from pystackreg import StackReg  # heavy C extension: imported where it is used

    return StackReg(getattr(StackReg, transformation)).register(
        np.asarray(ref, np.float64), np.asarray(mov, np.float64)
    )


def alignment_ncc(ref: np.ndarray, mov: np.ndarray, matrix: np.ndarray) -> float:
    """Normalised cross-correlation of ``ref`` and ``mov`` registered by ``matrix``.

    ``mov`` is resampled as ``mov(matrix @ p)`` (bilinear) and compared with
    ``ref`` over the pixels that sample inside ``mov``: 1 for identical
    images, about 0 for unrelated ones.  NaN when fewer than two pixels
    overlap or either image is flat there.
    """
    warped = warp_affine(mov, matrix)  # NaN where it samples outside mov
    inside = np.isfinite(warped)
    n = np.count_nonzero(inside)
    if n < 2:
        return float("nan")
    x = np.where(inside, np.asarray(ref, np.float32), np.float32(0)).ravel()
    y = np.where(inside, warped, np.float32(0)).ravel()
    sx, sy = x.sum(dtype=np.float64), y.sum(dtype=np.float64)
    cov = float(np.dot(x, y)) - sx * sy / n
    var = (float(np.dot(x, x)) - sx * sx / n) * (float(np.dot(y, y)) - sy * sy / n)
    return cov / np.sqrt(var) if var > 0 else float("nan")


def register_blocks(
    ref: np.ndarray,
    mov: np.ndarray,
    *,
    transformation: Transformation,
    nb_blocks: tuple[int, int] = (1, 1),
    origin: tuple[int, int] = (0, 0),
    method: Method = "stackreg",
    upsample_factor: int = 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Register ``mov`` onto ``ref`` block by block.

    Parameters
    ----------
    ref, mov : ndarray, shape (y, x)
        Reference and moving images (the registration area).
    transformation, method, upsample_factor
        See :func:`register_pair`.
    nb_blocks : (nx, ny)
        Blocks along x and along y.
    origin : (x0, y0)
        Full-image position of the images' top-left pixel.

    Returns
    -------
    matrices : ndarray, shape (ny, nx, 3, 3)
        One matrix per block, in full-image coordinates.
    confidence : ndarray, shape (ny, nx)
        :func:`alignment_ncc` of each block once registered.
    """
    nx, ny = nb_blocks
    rows = block_edges(ref.shape[0], ny)
    cols = block_edges(ref.shape[1], nx)
    matrices = np.empty((ny, nx, 3, 3))
    confidence = np.empty((ny, nx))
    for i in range(ny):
        for j in range(nx):
            win = np.s_[rows[i] : rows[i + 1], cols[j] : cols[j + 1]]
            local = register_pair(ref[win], mov[win], transformation=transformation, method=method,
                                  upsample_factor=upsample_factor)
            confidence[i, j] = alignment_ncc(ref[win], mov[win], local)
            matrices[i, j] = to_full_image(local, origin[0] + cols[j], origin[1] + rows[i])
    return matrices, confidence


def binarise(image: np.ndarray, threshold: float, *, index: int) -> np.ndarray:
    """Return ``image <= threshold`` as float64; :class:`StepError` naming slice ``index`` if empty."""
    binary = (image <= threshold).astype(np.float64)
    if not binary.any():
        raise StepError(
            f"[registration_calculation] threshold = {threshold!r} leaves no pixel <= threshold "
            f"in slice {index} (registration area): raise the threshold or remove it."
        )
    return binary


def register_chunk(
    block: np.ndarray,
    *,
    has_previous: bool,
    first_index: int,
    transformation: Transformation,
    nb_blocks: tuple[int, int] = (1, 1),
    threshold: float | None = None,
    origin: tuple[int, int] = (0, 0),
    method: Method = "stackreg",
    upsample_factor: int = 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise matrices of the slices of one chunk, and the confidence of each pair.

    Parameters
    ----------
    block : ndarray, shape (z, y, x)
        The chunk's slices, preceded by the last slice of the previous chunk
        when ``has_previous``.
    has_previous : bool
        Whether ``block[0]`` is only the reference of the first pair.  When
        false, the chunk starts the stack and its first matrix is the identity.
    first_index : int
        Slice number of ``block[0]`` (for error messages).
    transformation, nb_blocks, origin, method, upsample_factor
        See :func:`register_blocks`.
    threshold : float, optional
        Register the binarised images ``pixel <= threshold``.

    Returns
    -------
    matrices : ndarray, shape (z - has_previous, ny, nx, 3, 3)
    confidence : ndarray, shape (z - has_previous, ny, nx)
        :func:`alignment_ncc` of each pair (of the images registered, so
        binarised ones with ``threshold``); NaN for the stack's first slice.

    Raises
    ------
    StepError
        If ``threshold`` leaves no pixel in a slice.
    """
    if threshold is None:
        images = [block[k] for k in range(block.shape[0])]
    else:
        images = [binarise(block[k], threshold, index=first_index + k) for k in range(block.shape[0])]
    nx, ny = nb_blocks
    start = int(has_previous)
    matrices = np.empty((block.shape[0] - start, ny, nx, 3, 3))
    confidence = np.empty((block.shape[0] - start, ny, nx))
    for k in range(start, block.shape[0]):
        if k == 0:  # first slice of the stack: no reference
            matrices[0], confidence[0] = np.eye(3), np.nan
        else:
            matrices[k - start], confidence[k - start] = register_blocks(
                images[k - 1], images[k], transformation=transformation, nb_blocks=nb_blocks, origin=origin,
                method=method, upsample_factor=upsample_factor,
            )
    return matrices, confidence


def shift_outliers(
    matrices: np.ndarray, *, window: int = OUTLIER_WINDOW, n_mad: float = OUTLIER_MAD, min_px: float = OUTLIER_PX
) -> np.ndarray:
    """Flag the pairs whose translation is an outlier against the pairs around them.

    A pair is flagged when, for some block and axis, its translation is more
    than ``max(n_mad * 1.4826 * MAD, min_px)`` from the median of the
    ``window`` pairs centred on it (a Hampel filter; the windows shrink at the
    stack's ends).  ``min_px`` keeps a steady stack, whose MAD is near zero,
    from flagging its sub-pixel noise.

    Parameters
    ----------
    matrices : ndarray, shape (nz, ..., 3, 3)
        Pairwise matrices; ``matrices[0]`` (no pair) is never flagged.
    window : int
        Pairs in each window (odd, >= 3).
    n_mad : float
        Robust standard deviations (1.4826 MAD) allowed.
    min_px : float
        Deviation (px) never flagged.

    Returns
    -------
    ndarray of bool, shape (nz,)
    """
    if window < 3 or window % 2 == 0:
        raise ValueError(f"window = {window!r}: expected an odd number >= 3")
    mats = np.asarray(matrices, np.float64)
    t = mats[1:, ..., :2, 2].reshape(mats.shape[0] - 1, -1)  # (pairs, blocks x axes)
    flags = np.zeros(mats.shape[0], bool)
    if t.shape[0] < 3:
        return flags
    half = window // 2
    padded = np.pad(t, ((half, half), (0, 0)), constant_values=np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(padded, window, axis=0)  # (pairs, cols, window)
    median = np.nanmedian(windows, axis=-1)
    mad = np.nanmedian(np.abs(windows - median[..., None]), axis=-1)
    limit = np.maximum(n_mad * 1.4826 * mad, min_px)
    flags[1:] = (np.abs(t - median) > limit).any(axis=1)
    return flags


def zero_subpixel(matrices: np.ndarray) -> np.ndarray:
    """Return a copy of ``(..., 3, 3)`` matrices whose translations below one pixel are zeroed (per axis)."""
    out = np.array(matrices, dtype=np.float64, copy=True)
    t = out[..., :2, 2]
    t[np.abs(t) < 1.0] = 0.0
    return out


def cumulate(matrices: np.ndarray) -> np.ndarray:
    """Cumulative matrices ``C[0] = I``, ``C[k] = M[k] @ C[k - 1]`` of pairwise ``(nz, ..., 3, 3)`` matrices."""
    out = np.empty(np.shape(matrices), dtype=np.float64)
    out[0] = np.eye(3)
    for k in range(1, out.shape[0]):
        out[k] = matrices[k] @ out[k - 1]
    return out


def remove_drift(cumulative: np.ndarray, drift: tuple[float, float]) -> np.ndarray:
    """Remove ``k * (dx, dy)`` from the translation of cumulative matrix ``k``."""
    out = np.array(cumulative, dtype=np.float64, copy=True)
    k = np.arange(out.shape[0], dtype=np.float64).reshape((-1,) + (1,) * (out.ndim - 3))
    out[..., 0, 2] -= k * drift[0]
    out[..., 1, 2] -= k * drift[1]
    return out


def remove_running_mean(cumulative: np.ndarray, size: int) -> np.ndarray:
    """Subtract the running mean over ``size`` slices of the cumulative matrices (adding back ``I``).

    Only the fast fluctuations around the slow trend stay.  The window is
    centred; at the stack ends it repeats the end matrices (``mode='nearest'``).
    """
    from scipy.ndimage import uniform_filter1d

    c = np.asarray(cumulative, dtype=np.float64)
    return c - uniform_filter1d(c, size=size, axis=0, mode="nearest") + np.eye(3)


def _row_intervals(matrices: np.ndarray, shape: tuple[int, int], tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Per output row, the column interval whose samples stay inside the image for every matrix."""
    h, w = shape
    y = np.arange(h, dtype=np.float64)
    lo = np.full(h, -np.inf)
    hi = np.full(h, np.inf)
    flat = matrices.reshape(-1, 3, 3)
    for start in range(0, flat.shape[0], 256):  # batches bound the (batch, h) temporaries
        batch = flat[start : start + 256]
        for row, size in ((0, w), (1, h)):  # sampled x in [0, w-1], sampled y in [0, h-1]
            a, b, c = (batch[:, row, i, None] for i in range(3))
            rest = b * y + c  # sampled coordinate at x = 0, shape (batch, h)
            flat_a = np.abs(a) < 1e-12  # the sample does not depend on x: all or nothing
            inside = (rest >= -tol) & (rest <= size - 1 + tol)
            safe_a = np.where(flat_a, 1.0, a)
            bound0, bound1 = (-tol - rest) / safe_a, (size - 1 + tol - rest) / safe_a
            low = np.where(flat_a, np.where(inside, -np.inf, np.inf), np.minimum(bound0, bound1))
            high = np.where(flat_a, np.where(inside, np.inf, -np.inf), np.maximum(bound0, bound1))
            lo = np.maximum(lo, low.max(axis=0))
            hi = np.minimum(hi, high.min(axis=0))
    return np.maximum(np.ceil(lo), 0), np.minimum(np.floor(hi), w - 1)


def valid_rectangle(
    matrices: np.ndarray, shape: tuple[int, int], *, tol: float = 1e-6
) -> tuple[int, int, int, int]:
    """Largest axis-aligned rectangle whose pixels sample inside the image for every matrix.

    Computed from the matrices alone: for each output row, each matrix allows
    an interval of columns (the samples are affine in ``x``); the rectangle
    maximises area over the intersection of these intervals.

    Parameters
    ----------
    matrices : ndarray, shape (..., 3, 3)
        Cumulative matrices (every block of every slice).
    shape : (H, W)
        Image shape.
    tol : float
        Samples this close (px) outside the image still count as inside
        (rounding of the matrices).

    Returns
    -------
    (row_start, row_stop, col_start, col_stop)
        Python slice bounds.

    Raises
    ------
    StepError
        If no pixel is inside the image for every matrix.
    """
    lo, hi = _row_intervals(np.asarray(matrices, np.float64), shape, tol)
    best = (0, 0, 0, 0, 0)  # area, r0, r1, c0, c1
    for top in np.flatnonzero(hi >= lo):
        left = np.maximum.accumulate(lo[top:])
        right = np.minimum.accumulate(hi[top:])
        width = np.maximum(right - left + 1, 0)
        area = width * np.arange(1, width.size + 1)
        k = int(np.argmax(area))
        if area[k] > best[0]:
            best = (int(area[k]), int(top), int(top + k + 1), int(left[k]), int(right[k] + 1))
    if best[0] == 0:
        raise StepError(
            "[registration_transformation] cropping = true leaves no pixel: no pixel of the "
            "output stays inside every slice once registered."
        )
    return best[1:]
