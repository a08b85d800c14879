"""Casting results back to the stack's dtype, non-finite pixels, and per-slice statistics."""

from __future__ import annotations

import numpy as np


def clip_cast(block: np.ndarray, dtype: np.dtype | str) -> np.ndarray:
    """Return ``block`` in ``dtype``: clipped to its range, rounded for integers.

    NaN (pixels coming from outside the image in registration with
    ``mode='constant'``) becomes 0 for integer dtypes and stays NaN for floats.
    Rounding, not truncation, so that a step that changes nothing returns the
    input exactly.
    """
    dtype = np.dtype(dtype)
    if block.dtype == dtype:
        return block
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        if block.dtype.kind != "f":
            return np.clip(block, info.min, info.max).astype(dtype)
        # Slice by slice, in place in one slice-sized buffer that stays in cache (twice as fast
        # as whole-chunk passes); float32 holds every uint8/uint16 value and half-integer exactly.
        out = np.empty(block.shape, dtype)
        work = np.empty(block.shape[1:], np.result_type(block.dtype, np.float32))
        for i in range(block.shape[0]):
            np.copyto(work, block[i])
            if info.min != 0:
                np.copyto(work, 0, where=np.isnan(work))
            # fmax/fmin clip and turn NaN into the other operand: 0 for unsigned types
            np.fmax(work, info.min, out=work)
            np.fmin(work, info.max, out=work)
            np.rint(work, out=work)
            out[i] = work
        return out
    if dtype.kind == "f":
        info = np.finfo(dtype)
        return np.clip(block, info.min, info.max).astype(dtype)
    raise TypeError(f"unsupported output dtype {dtype}")


def fill_nonfinite(block: np.ndarray) -> np.ndarray:
    """A float ``(z, y, x)`` block with its non-finite pixels set to their slice's mean (0 in an empty slice).

    Those pixels are the NaN border of a registration with ``mode = "constant"``
    on a float stack.  Returns ``block`` itself when every pixel is finite, else a copy.
    """
    bad = ~np.isfinite(block)
    if not bad.any():
        return block
    block = block.copy()
    for img, m in zip(block, bad):
        if m.any() and not m.all():
            img[m] = img[~m].mean()
    block[bad.all(axis=(1, 2))] = 0
    return block


def slice_stats(block: np.ndarray) -> np.ndarray:
    """Per-slice ``(min, max, mean)`` of a ``(z, y, x)`` block, ignoring NaN, as float64 ``(z, 3)``.

    A slice that is entirely NaN gives NaN statistics.
    """
    flat = block.reshape(block.shape[0], -1)
    out = np.full((block.shape[0], 3), np.nan)
    if flat.shape[1] == 0:
        return out
    if flat.dtype.kind == "f":
        # fmin/fmax skip NaN natively; a row's float64 sum is NaN only if the row holds NaN, and
        # only those rows pay for nanmean: one fast pass per statistic instead of masked copies
        with np.errstate(invalid="ignore"):
            out[:, 0] = np.fmin.reduce(flat, axis=1)
            out[:, 1] = np.fmax.reduce(flat, axis=1)
            sums = flat.sum(axis=1, dtype=np.float64)
        out[:, 2] = sums / flat.shape[1]
        nan_rows = np.flatnonzero(np.isnan(sums) & ~np.isnan(out[:, 0]))
        if nan_rows.size:
            out[nan_rows, 2] = np.nanmean(flat[nan_rows], axis=1, dtype=np.float64)
        return out
    out[:, 0] = flat.min(axis=1)
    out[:, 1] = flat.max(axis=1)
    # an exact integer sum is faster than a float64 mean and cannot overflow for 8/16-bit slices
    acc = np.uint64 if flat.dtype.kind == "u" else np.int64
    out[:, 2] = flat.sum(axis=1, dtype=acc) / flat.shape[1]
    return out
