"""Translation between two images by cross-correlation, refined by an upsampled DFT (numpy or CuPy).

The estimator of Guizar-Sicairos, Thurman & Fienup (2008): the integer peak
of the cross-correlation (one inverse FFT), then the cross-correlation
evaluated on a grid ``1 / upsample_factor`` px fine over the 1.5 px around
that peak by a matrix-multiply DFT (no large zero-padded FFT), and a
parabola through the finest grid's peak and its neighbours.

What makes it as accurate as TurboReg's spline fit (pystackreg) on grey and
binarised images, measured in ``benchmarks/bench_registration.py``:

* the images are mean-centred and tapered by a Tukey window, so that the
  periodic wrap of the FFT (the image edges) adds no peak at zero shift;
* a second pass moves the moving image's window along with its content: one
  window for both biases the peak towards zero shift, by an amount that grows
  with the shift;
* both images are smoothed by a Gaussian of 1 px (a weight on the spectrum):
  the correlation of binarised images, whose sharp edges alias, is then
  smooth enough to interpolate;
* the cross-power spectrum is not whitened to unit magnitude ("phase
  correlation" proper): whitening amplifies the quantisation noise of 8-bit
  images and was 10-100x less accurate here.

Everything runs in the array module of the inputs (``xp``: numpy, or CuPy
for CuPy arrays) in float32 / complex64; numpy's FFT is scipy.fft's
pocketfft and CuPy's is cuFFT.  All of it releases the GIL: unlike
pystackreg, pairs run side by side in threads.  The matrix products go
through BLAS, whose rounding depends on its thread count (1e-4 px here):
callers that need identical results everywhere fix it (the step runs with
one BLAS thread, as ``distributed``'s workers do).

The result follows the matrix convention of
:mod:`pystack3d_dask.kernels.registration`: ``out(p) = mov(M p)``, so the
translation of ``M`` is the displacement of the moving image's content
relative to the reference.  A translation does not depend on the region it
is measured on, so the whole images are used (pystackreg uses
``[:-1, :-1]``; the tapered window gives the last row and column no weight
anyway).
"""

from __future__ import annotations

import functools
import importlib
import sys
from types import ModuleType

import numpy as np

from pystack3d_dask.kernels.fft import irfft2

#: each end of the window's cosine taper (Tukey): this fraction of the side, at least TAPER_PX px
TAPER, TAPER_PX = 0.05, 16
#: Gaussian smoothing (px) of both images, applied to the cross-power spectrum
SMOOTHING = 1.0
#: FFT module for each array module (pocketfft keeps float32; numpy.fft is ~1.6x slower)
_FFT_MODULES = {"numpy": "scipy.fft", "cupy": "cupyx.scipy.fft"}


def array_module(arr) -> ModuleType:
    """The array module of ``arr``: CuPy for a CuPy array, numpy otherwise (never imports CuPy)."""
    cupy = sys.modules.get("cupy")
    return cupy if cupy is not None and isinstance(arr, cupy.ndarray) else np


def _fft(xp: ModuleType) -> ModuleType:
    return importlib.import_module(_FFT_MODULES[xp.__name__])


def _taper(n: int, lo: float, hi: float, xp: ModuleType):
    """``n`` samples of a Tukey window spanning ``[lo, hi]`` (px; zero outside), float32."""
    x = np.arange(n, dtype=np.float64)
    dist = np.minimum(x - lo, hi - x)  # to the nearer end; negative outside
    edge = min(max(TAPER * (hi - lo), TAPER_PX), (hi - lo) / 2)  # px per taper
    w = np.where(dist < edge, 0.5 - 0.5 * np.cos(np.pi * np.clip(dist, 0, None) / max(edge, 1e-9)), 1.0)
    return xp.asarray(np.where(dist < 0, 0.0, w), dtype=xp.float32)


def _windowed(image, box: tuple[tuple[float, float], tuple[float, float]], xp: ModuleType):
    """Mean-centred ``image`` times the Tukey window spanning ``box = ((y_lo, y_hi), (x_lo, x_hi))``."""
    img = xp.asarray(image, dtype=xp.float32)
    (y_lo, y_hi), (x_lo, x_hi) = box
    return (img - img.mean()) * _taper(img.shape[0], y_lo, y_hi, xp)[:, None] * _taper(img.shape[1], x_lo, x_hi, xp)


@functools.lru_cache(maxsize=8)
def _smoothing(shape: tuple[int, int], xp: ModuleType):
    """Half-spectrum of a Gaussian of ``SMOOTHING`` px applied to both images: ``|G|^2``.

    Kept for the next pair of the same shape: the float64 exponential takes as long as an FFT.
    """
    f2 = np.fft.fftfreq(shape[0])[:, None] ** 2 + np.fft.rfftfreq(shape[1])[None, :] ** 2
    return xp.asarray(np.exp(-4 * np.pi**2 * SMOOTHING**2 * f2), dtype=xp.float32)


def _upsampled_correlation(cross, shape: tuple[int, int], ys, xs, xp: ModuleType):
    """Real cross-correlation at the positions ``ys`` x ``xs`` (px) from its half spectrum ``cross``.

    The inverse DFT as two matrix products (Guizar-Sicairos et al., eq. 12),
    on the ``rfft2`` half spectrum: each column ``0 < kx < nx / 2`` stands for
    itself and its conjugate mirror, hence the weight 2 and the real part.
    """
    ny, nx = shape
    ky = xp.asarray(np.fft.fftfreq(ny), dtype=xp.float32)
    kx = xp.asarray(np.fft.rfftfreq(nx), dtype=xp.float32)
    weight = xp.full(kx.shape, 2.0, dtype=xp.float32)
    weight[0] = 1.0
    if nx % 2 == 0:
        weight[-1] = 1.0  # the Nyquist column has no mirror
    ex = xp.exp((2j * np.pi) * kx[:, None] * xp.asarray(xs, dtype=xp.float32)[None, :]) * weight[:, None]
    ey = xp.exp((2j * np.pi) * xp.asarray(ys, dtype=xp.float32)[:, None] * ky[None, :])
    return (ey.astype(xp.complex64) @ (cross @ ex.astype(xp.complex64))).real


def _parabola_offset(left: float, centre: float, right: float) -> float:
    """Vertex of the parabola through three equally spaced values, in units of the spacing (0 if flat)."""
    curvature = left - 2.0 * centre + right
    return 0.5 * (left - right) / curvature if curvature < 0 else 0.0


def translation(ref, mov, *, upsample_factor: int = 20) -> tuple[float, float]:
    """Return ``(tx, ty)``, the displacement in px of ``mov``'s content relative to ``ref``.

    Parameters
    ----------
    ref, mov : ndarray (numpy or CuPy), shape (y, x)
        Reference and moving images, any real dtype (grey or binarised).
    upsample_factor : int
        The cross-correlation is evaluated every ``1 / upsample_factor`` px
        around its integer peak; a parabola through the finest peak refines
        further.  1 gives the integer peak only.

    Returns
    -------
    (tx, ty) : floats
        ``mov(p + t) ~ ref(p)``; x is the column, y the row.

    Raises
    ------
    ValueError
        If the shapes differ or ``upsample_factor < 1``.

    References
    ----------
    M. Guizar-Sicairos, S. T. Thurman and J. R. Fienup, "Efficient subpixel
    image registration algorithms", Opt. Lett. 33, 156-158 (2008).

    Examples
    --------
    >>> from scipy import ndimage
    >>> img = ndimage.gaussian_filter(np.random.default_rng(0).random((64, 64)), 2)
    >>> tx, ty = translation(img[8:56, 8:56], img[5:53, 10:58])  # content moved by (-2, +3)
    >>> round(tx, 1), round(ty, 1)
    (-2.0, 3.0)
    """
    if ref.shape != mov.shape or len(ref.shape) != 2 or min(ref.shape) < 2:
        raise ValueError(f"ref and mov must be 2-D images of one shape, at least 2 x 2, got {ref.shape} and "
                         f"{mov.shape}")
    if int(upsample_factor) != upsample_factor or upsample_factor < 1:
        raise ValueError(f"upsample_factor = {upsample_factor!r}: expected an integer >= 1")
    xp = array_module(ref)
    fft = _fft(xp)
    shape = tuple(ref.shape)
    smoothing = _smoothing(shape, xp)
    whole = ((0.0, shape[0] - 1.0), (0.0, shape[1] - 1.0))
    ref_spectrum = fft.rfft2(_windowed(ref, whole, xp)).conj() * smoothing
    # F(mov) F(ref)*: the correlation peaks at the displacement of mov's content
    cross = fft.rfft2(_windowed(mov, whole, xp)) * ref_spectrum
    corr = irfft2(cross, shape) if xp is np else fft.irfft2(cross, s=shape)
    peak = np.unravel_index(int(corr.argmax()), shape)
    # signed integer shift: positions past the middle wrap to negative shifts
    y0, x0 = (p - n if p > n // 2 else p for p, n in zip(peak, shape))
    if upsample_factor == 1:
        return float(x0), float(y0)
    tx, ty = _refine(cross, shape, x0, y0, upsample_factor, xp)
    # One window for both images biases the peak towards zero shift, by an amount that grows
    # with the shift.  Second pass: windows over the overlap only, mov's moved with its content.
    overlap = tuple((max(0.0, -t), n - 1.0 - max(0.0, t)) for t, n in zip((ty, tx), shape))
    moved = tuple((lo + t, hi + t) for (lo, hi), t in zip(overlap, (ty, tx)))
    if min(hi - lo for lo, hi in overlap) < 2:  # tiny images moved by about their size
        return tx, ty
    cross = fft.rfft2(_windowed(mov, moved, xp)) * fft.rfft2(_windowed(ref, overlap, xp)).conj() * smoothing
    return _refine(cross, shape, tx, ty, upsample_factor, xp)


def _refine(cross, shape, x0: float, y0: float, upsample_factor: int, xp) -> tuple[float, float]:
    """Peak of the cross-correlation within 0.75 px of ``(x0, y0)``: upsampled DFT, then a parabola."""
    half = int(np.ceil(0.75 * upsample_factor))
    offsets = np.arange(-half, half + 1) / upsample_factor
    fine = _upsampled_correlation(cross, shape, y0 + offsets, x0 + offsets, xp)
    j, i = np.unravel_index(int(fine.argmax()), fine.shape)
    ty, tx = y0 + offsets[j], x0 + offsets[i]
    if 0 < j < fine.shape[0] - 1 and 0 < i < fine.shape[1] - 1:
        col, row = fine[j - 1 : j + 2, i], fine[j, i - 1 : i + 2]
        ty += _parabola_offset(*(float(v) for v in col)) / upsample_factor
        tx += _parabola_offset(*(float(v) for v in row)) / upsample_factor
    return float(tx), float(ty)
