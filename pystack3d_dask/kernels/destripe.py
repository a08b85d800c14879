"""One block of slices destriped on the CPU: the destriping step's kernel, whatever the method.

Light on purpose (numpy and scipy, no dask): with the threaded scheduler the
step runs it in the worker processes of :mod:`pystack3d_dask.processes`,
which import it before their first block.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from pystack3d_dask.kernels.dtype import fill_nonfinite
from pystack3d_dask.kernels.vsnr import vsnr
from pystack3d_dask.kernels.vsnr_tiles import vsnr_tiles
from pystack3d_dask.kernels.wavelet_destripe import wavelet_destripe


def nonfinite_filled(fn: Callable[..., np.ndarray], block: np.ndarray, /, **kw: Any) -> np.ndarray:
    """``fn(block, **kw)`` on ``block`` as float32 with its non-finite pixels set to their slice's mean.

    Those pixels (see :func:`~pystack3d_dask.kernels.dtype.fill_nonfinite`)
    stay NaN in the result; an empty slice stays empty.
    """
    block = np.asarray(block, np.float32)
    bad = ~np.isfinite(block)
    if not bad.any():
        return fn(block, **kw)
    out = fn(fill_nonfinite(block), **kw)
    out[bad] = np.nan
    return out


def pyvsnr_slices(block: np.ndarray, *, filters: Sequence[Mapping[str, Any]], maxit: int,
                  cvg_threshold: float) -> np.ndarray:
    """VSNR by the pyvsnr package (AGPL-3, optional), one slice per call as PyStack3D calls it."""
    from pyvsnr import vsnr2d

    out = np.empty(block.shape, np.float32)
    try:
        for k, img in enumerate(block):
            # one slice per call: pyvsnr stops a batch on its worst slice
            out[k] = vsnr2d(np.asarray(img, np.float32), [dict(f) for f in filters], maxit=maxit,
                            algo="numpy", norm=False, cvg_threshold=cvg_threshold)
    finally:
        np.fft = sys.modules["numpy.fft"]  # pyvsnr swaps numpy.fft for pyfftw process-wide
    return out


def destripe(block: np.ndarray, *, method: Literal["numpy", "pyvsnr", "wavelet"], tiles: int = 1,
             overlap: int = 0, **kw: Any) -> np.ndarray:
    """Destripe a block ``(z, y, x)`` slice by slice on one CPU thread; float32 out.

    ``method``: our VSNR (:func:`~pystack3d_dask.kernels.vsnr.vsnr`, in
    ``tiles`` x-tiles of ``overlap`` columns when more than one), pyvsnr's, or
    the wavelet-FFT filter; ``kw`` are the method's parameters.
    """
    if method == "numpy":
        fn = vsnr if tiles == 1 else functools.partial(vsnr_tiles, tiles=tiles, overlap=overlap)
        return nonfinite_filled(fn, block, workers=1, **kw)
    methods = {"pyvsnr": pyvsnr_slices, "wavelet": wavelet_destripe}
    if method not in methods:
        raise ValueError(f"method = {method!r}: expected 'numpy', 'pyvsnr' or 'wavelet'")
    return nonfinite_filled(methods[method], block, **kw)
