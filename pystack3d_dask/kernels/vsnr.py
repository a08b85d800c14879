"""VSNR: the variational stationary noise remover, for numpy and CuPy (``xp``-generic).

Model (Fehrenbach, Weiss & Lorenzo 2012).  An image ``u0`` is the sum of the
clean image ``u`` and a stationary noise ``b = sum_i psi_i * lambda_i``: known
patterns ``psi_i`` (a Dirac for white noise, an elongated Gabor / Gaussian for
curtains) convolved with unknown random fields.  VSNR solves

    min_lambda  ||grad(u0 - psi * lambda)||_1  +  ||lambda||^2 / 2

where all the filters have been folded into one, ``|F psi|^2 = sum_i
|F psi_i|^2 / alpha_i``, and ``alpha_i`` sets the strength of filter ``i``.
The problem is solved by ADMM in the Fourier domain with periodic boundaries,
one 2-D slice at a time.

Normalisation (the part a PyStack3D ``params.toml`` relies on; it follows the
reference implementation, ``pyvsnr`` 2.3 called with ``norm=False``):

* each slice is divided by its maximum before the solve and multiplied back
  after, so the TV threshold ``1 / beta`` is relative to the slice's maximum;
* ``alpha_i = sqrt(N) N^2 max_k(|F d(k)| |F psi_i(k)|^2) / (||u0|| eta_i)``
  with ``N`` the number of pixels, ``eta_i`` the filter's ``noise_level``,
  ``d`` the two finite-difference kernels (the larger of the two maxima) and
  ``||u0||`` the Euclidean norm of the scaled slice: the correction strength
  follows the image's norm;
* a Gabor filter is the Gaussian ``exp(-(x_t^2 / sx^2 + y_t^2 / sy^2) / 2)``
  (``sigma = [sx, sy]``, axes rotated by ``theta`` degrees) sampled on the
  slice's grid around the pixel ``(ny / 2 + 1, nx / 2 + 1)`` without wrapping,
  so its spectrum on a given grid is the reference's;
* stopping: after iteration ``i >= 1``, stop when ``max|fx - fx_old| <=
  cvg_threshold * max|fx|`` (``fx`` the Fourier coefficients of the current
  ``lambda``), or after ``maxit`` iterations.  The rule is applied to each
  slice on its own, whatever the batch.

Solvers (``solver=``; the same problem, hence the same minimiser):

* ``"admm"``: the reference's ADMM, penalty ``beta = 10``; its iterates,
  stopping point and result (to ~1e-3) are pyvsnr's (on the rows its filter
  reaches, Speed below);
* ``"fast"``: the same ADMM over-relaxed (Eckstein & Bertsekas 1992) with
  ``alpha = 1.6``, penalty ``beta = 20``, started from ``y = 0`` (the
  reference starts from ``y = grad u0``, so that its first iteration returns
  ``s = 0``).  A relaxed step is ``alpha`` times the plain ADMM step from the
  same point (``lambda`` is linear in the Douglas-Rachford variable), so the
  stopping rule divides the change of ``fx`` by ``alpha``: ``cvg_threshold``
  bounds the plain step in both.  Measured on synthetic curtained slices
  (128 x 118 to 2048 x 2048, Gabor ``[0.5, 200]``): at ``cvg_threshold =
  1e-2`` it stops after 0.65-0.75x the iterations of ``"admm"``, at 1e-3
  after 0.37-0.53x, always closer to the minimiser (0.7-0.96x the
  distance).  ``alpha = 1.8`` stopped closer still, but after 0.9x the
  iterations at 1e-2 (PyStack3D's usual threshold).  ``"admm"`` converges
  slowly: after 600-1000 iterations it is still 3-4 % (RMS, relative to the
  correction) from the minimiser.  The relaxation costs no memory (it is
  folded into the stored ``z``) and two elementwise passes per iteration.

Speed (what differs from a textbook transcription, not the result):

* the reference does two forward and two inverse FFTs per iteration.  Both
  ``A = grad psi *`` and its adjoint are a convolution by ``psi`` and a finite
  difference; the differences are done in real space, so one ``rfft2`` and one
  ``irfft2`` per iteration remain, and the ADMM's split variable ``y`` and
  multiplier ``mu`` collapse into one pair of arrays ``z = alpha grad u0 - mu /
  beta + (1 - alpha) y`` (``alpha``: the relaxation, 1 for ``"admm"``);
* on the CPU the inverse transform runs as its two 1-D passes (pocketfft's
  ``irfft2`` takes 1.5-1.8x their time);
* the elementwise operations of an iteration (21 for ``"admm"``, 23 for
  ``"fast"``: TV shrinkage, multiplier update, differences), and the stopping
  rule with the spectral filter (9), run on bands of :data:`BAND_ELEMENTS`
  pixels that stay in the CPU cache instead of whole-slice passes through
  memory; on a GPU the band is the whole slice.  Bands are sized by pixels,
  not rows: on a narrow slice, bands of a few rows spend their time in Python
  calls that hold the GIL, and the threads of a dask worker take turns.
  Bands do not change the bits of the result;
* measured on a shared 2-core machine (one iteration, one thread, CPU time):
  300 x 340 1.5 ms, 1024 x 904 24 ms, 2048 x 2048 70 ms, that is 0.75x,
  0.9x and 0.7x the time of the kernel of November 2026 (commit 88fa41e);
  the FFTs take 50-70 % (at 1024 x 904 the transforms of length 904 = 8 x 113
  alone take half), the elementwise passes 25-40 %;
* a filter of vertical stripes, long along y, reaches only a few y
  frequencies: the Gabor ``[0.5, 200]`` has 15 rows of a 1024-row spectrum
  above 1e-6 of its peak, 13 of 2048 (the 1024 tail is the grid's cut of
  the Gaussian).  Both solvers (:attr:`Solver.row_tolerance` 1e-6) drop the
  other rows, which bounds the x-update's multiplier there by
  1e-6 of its peak (:func:`spectrum_rows`): the y transform becomes a product
  with those rows' cosines and sines, before the x transform of ``2m`` rows
  only, and the spectral passes run on ``m`` rows (:func:`_transforms`), the
  stopping rule's maxima too (its weights ``|F psi| / (1 + b g2 w)`` are
  below 1e-3 of their peak on the dropped rows, the square root of the bound).
  Measured (30 iterations, one thread): 0.32x the time of the whole
  spectrum at 1024 x 904, 0.47x at 2048 x 2048, 0.63x at 1024 x 1024; the
  result moves by 5e-5 of the correction's RMS (3e-3 grey levels at most;
  the products' float32 rounding alone gives 1.5e-5) and stops at the same
  iteration; ``"admm"`` stays within 1e-3 of pyvsnr (measured 1024 x 904,
  100 iterations).  In a PyStack3D chain at 60 x 1024 x 1024 the
  destriping step took 0.6x the time of the whole spectrum's.  The products
  run in BLAS, which the engine keeps on one thread per task (its threaded
  scheduler limits it, distributed workers start with
  ``OPENBLAS_NUM_THREADS=1``); a threaded BLAS gives other last bits (5e-4
  grey levels, measured) and is slower on such thin products.
  Tilted or Dirac filters reach most rows: the FFTs stay;
* ``pad=True`` extends each slice periodically on both sides (``numpy.pad``
  mode ``"wrap"``, the closest to the unpadded periodic model of the modes
  tried) up to a size with fast FFTs (:func:`fast_shape`) and crops the
  result.  It moves the periodic boundary, so the result departs from the
  unpadded one near the edges: on 1024 x 904 synthetic slices whose left and
  right edges differ by up to 60 grey levels (a step the periodic model sees),
  up to 7 grey levels in the outer columns, 2 RMS in the outer 4, at most 0.5
  beyond 64 pixels (20 iterations); with early stopping a slice may also stop
  an iteration or two apart.

References
----------
J. Fehrenbach, P. Weiss, C. Lorenzo, "Variational algorithms to remove
stationary noise: applications to microscopy imaging", IEEE Trans. Image
Process. 21(10), 4420-4430 (2012).
J. Eckstein, D. P. Bertsekas, "On the Douglas-Rachford splitting method and
the proximal point algorithm for maximal monotone operators", Math.
Program. 55, 293-318 (1992).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, Literal, NamedTuple

import numpy as np
import scipy  # scipy.fft is imported on first use (scipy loads its submodules lazily)

from pystack3d_dask.kernels.fft import irfft2


class Solver(NamedTuple):
    """How the ADMM runs (module docstring, Solvers); the minimiser does not depend on it."""

    #: penalty of the ADMM
    beta: float
    #: over-relaxation (1: none)
    alpha: float
    #: start from y = 0 rather than y = grad u0 (the reference's, whose first iteration gives s = 0)
    y0_zero: bool
    #: transform only the spectrum rows whose filter exceeds this share of its peak (module
    #: docstring, Speed; 0: the whole spectrum)
    row_tolerance: float


#: "admm" is pyvsnr's (beta 10, PyStack3D never changes it), "fast" reaches the minimiser sooner
SOLVERS: dict[str, Solver] = {"admm": Solver(10.0, 1.0, False, 1e-6), "fast": Solver(20.0, 1.6, True, 1e-6)}
#: the row transforms replace the FFTs only up to ``ny / MAX_ROWS_SHARE`` rows: their two
#: matrix products cost ``4 ny nx`` flops a row; measured break-even (one thread) about ny / 20
MAX_ROWS_SHARE = 32
#: keys each filter needs, by filter name
FILTER_KEYS: dict[str, tuple[str, ...]] = {
    "Gabor": ("noise_level", "sigma", "theta"),
    "Dirac": ("noise_level",),
}
#: elements (float32) per band of the elementwise passes on the CPU, whatever the slice's width: a
#: numpy call on fewer spends more time in Python (holding the GIL, so that two threads take turns
#: instead of sharing the work) than in its loop; on more, the band's ~5 work arrays (256 KiB each)
#: leave the L2/L3 cache.  Measured (2 cores): 16 rows of 340 pixels ran 2 threads at the speed of
#: one, 64k elements x1.7-1.9 from 300 x 340 to 2048 x 2048; one thread alike from 16k to 256k
BAND_ELEMENTS = 65536

FilterKey = tuple[tuple[str, float, float, float, float], ...]


def filter_key(filters: Sequence[Mapping[str, Any]]) -> FilterKey:
    """Return ``filters`` as a hashable tuple ``(name, noise_level, sx, sy, theta)`` per filter."""
    key = []
    for f in filters:
        sx, sy = f.get("sigma", (0.0, 0.0))
        key.append((str(f["name"]), float(f["noise_level"]), float(sx), float(sy),
                    float(f.get("theta", 0.0))))
    return tuple(key)


def gabor(shape: tuple[int, int], sigma: tuple[float, float], theta: float) -> np.ndarray:
    """The Gabor (here: Gaussian, zero frequency) stripe pattern on a ``(ny, nx)`` grid, float64.

    ``sigma = (sx, sy)`` are the standard deviations in pixels along the
    axes rotated by ``theta`` degrees; ``sy`` large and ``sx`` small
    describes vertical stripes.  The pattern is centred on
    ``(ny / 2 + 1, nx / 2 + 1)`` and not wrapped, like the reference
    implementation: only the modulus of its spectrum matters, and that
    depends on the sampling grid.
    """
    ny, nx = shape
    t = math.radians(theta)
    x = (nx / 2.0 + 1.0) - np.arange(nx)[None, :]
    y = (ny / 2.0 + 1.0) - np.arange(ny)[:, None]
    xt = x * math.cos(t) + y * math.sin(t)
    yt = y * math.cos(t) - x * math.sin(t)
    return np.exp(-0.5 * ((xt / sigma[0]) ** 2 + (yt / sigma[1]) ** 2))


def _difference_moduli(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``|F d_x|`` and ``|F d_y|`` of the periodic forward differences, on the rfft2 grid."""
    ny, nx = shape
    fdx = 2.0 * np.abs(np.sin(np.pi * np.arange(nx // 2 + 1) / nx))
    fdy = 2.0 * np.abs(np.sin(np.pi * np.arange(ny) / ny))
    return fdx[None, :], fdy[:, None]


@functools.lru_cache(maxsize=8)
def stripe_spectrum(filters: FilterKey, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The folded filter's spectrum and the gradient's, on the rfft2 grid of ``shape``.

    Returns ``(g2, w)``, float32 arrays of shape ``(ny, nx // 2 + 1)``:
    ``g2 = sum_i eta_i |F psi_i|^2 / (sqrt(N) nmax_i)`` so that, for a slice
    of norm ``||u0||``, the folded filter has ``|F psi|^2 = ||u0|| g2``
    (module docstring), and ``w = |F d_x|^2 + |F d_y|^2``.  Built once per
    slice shape and filter set (cached).
    """
    n = shape[0] * shape[1]
    fdx, fdy = _difference_moduli(shape)
    g2 = np.zeros((shape[0], shape[1] // 2 + 1))
    for name, eta, sx, sy, theta in filters:
        if name == "Dirac":
            power = np.ones_like(g2)
        else:
            power = np.abs(scipy.fft.rfft2(gabor(shape, (sx, sy), theta))) ** 2
        nmax = max((fdx * power).max(), (fdy * power).max())
        g2 += power * (eta / (math.sqrt(n) * nmax))
    return g2.astype(np.float32), (fdx**2 + fdy**2).astype(np.float32)


def fast_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The smallest ``(ny, nx) >= shape`` of the same parity whose prime factors are 2, 3, 5, 7, 11.

    pocketfft and cuFFT are several times slower on other sizes (1024 x 904,
    904 = 8 x 113, costs 2-3x the FFT time of 1024 x 924); these factors are
    all fast in both, so the padding stays minimal.  The parity is kept
    because the Gabor pattern is centred on pixel ``n / 2 + 1``: a grid of the
    other parity would sample it half a pixel off, which changes a narrow
    Gabor's spectrum (and the result) everywhere, not only near the edges.
    """
    return _fast_len(int(shape[0])), _fast_len(int(shape[1]))


def _fast_len(n: int) -> int:
    m = scipy.fft.next_fast_len(n)
    while m % 2 != n % 2:
        m = scipy.fft.next_fast_len(m + 1)
    return m


def spectrum_rows(filters: FilterKey, shape: tuple[int, int], tolerance: float) -> np.ndarray | None:
    """The rows (y frequencies) of the rfft2 grid that the solver keeps, or None for all.

    A row is kept where the folded filter's ``g2`` somewhere exceeds
    ``tolerance`` times ``g2`` at frequency 0 (:func:`stripe_spectrum`).  The
    x-update's multiplier ``K = b g2 / (1 + b g2 w)`` is at most ``b g2`` and
    equals ``b g2`` at frequency 0 (``w = 0`` there), so on every dropped row
    ``K`` is below ``tolerance`` times its largest value, whatever the
    slice's norm and the penalty ``b``.  None when ``tolerance`` is 0 or more
    than ``ny / MAX_ROWS_SHARE`` rows are kept (the FFTs are then cheaper).
    """
    if tolerance <= 0:
        return None
    g2, _ = stripe_spectrum(filters, shape)
    rows = np.flatnonzero(g2.max(axis=1) > tolerance * g2[0, 0])
    return rows if len(rows) * MAX_ROWS_SHARE <= shape[0] else None


def _transforms(xp: ModuleType, workers: int, shape: tuple[int, int], rows: np.ndarray | None):
    """``(forward, inverse)``: real slices ``(b, ny, nx)`` to the rows ``rows`` of their rfft2, and back.

    With ``rows`` None, ``rfft2`` and its inverse.  Otherwise the y transform
    is a product with the ``2m`` cosines and sines of the ``m`` rows' frequencies
    (``sum_y e^{-i k y} r = C r - i S r``), done before the x transform so that
    only ``2m`` rows go through it; the inverse alike, after the x transform
    (irfft is real-linear: ``irfft(e^{i k y} f) = cos(k y) irfft(f) + sin(k y)
    irfft(i f)``).  Dropped rows read as zero in the inverse.
    """
    ny, nx = shape
    if xp is np:
        if rows is None:
            return (functools.partial(scipy.fft.rfft2, workers=workers),
                    functools.partial(irfft2, s=shape, workers=workers, overwrite_x=True))
        rfft = functools.partial(scipy.fft.rfft, axis=-1, workers=workers)
        irfft = functools.partial(scipy.fft.irfft, n=nx, axis=-1, overwrite_x=True, workers=workers)
    else:
        import cupyx.scipy.fft as cufft  # cuFFT; plans are cached across calls

        if rows is None:
            return (functools.partial(cufft.rfft2, overwrite_x=True),
                    functools.partial(cufft.irfft2, s=shape, overwrite_x=True))
        rfft = functools.partial(cufft.rfft, axis=-1)
        irfft = functools.partial(cufft.irfft, n=nx, axis=-1, overwrite_x=True)
    m = len(rows)
    phase = (2 * np.pi / ny) * np.outer(rows, np.arange(ny))
    waves = np.concatenate([np.cos(phase), np.sin(phase)])  # (2m, ny)
    project = xp.asarray(waves.astype(np.float32))
    expand = xp.asarray((waves.T / ny).astype(np.float32))  # the inverse's 1 / ny

    def forward(r):
        f = rfft(project @ r)
        return f[:, :m] - 1j * f[:, m:]

    def inverse(spec):
        return expand @ irfft(xp.concatenate([spec, 1j * spec], axis=1))

    return forward, inverse


def _forward_differences(u, out1, out2, xp):
    """``out1 = u - u shifted left by one column``, ``out2 = ... up by one row`` (periodic)."""
    xp.subtract(u, xp.roll(u, -1, axis=-1), out=out1)
    xp.subtract(u, xp.roll(u, -1, axis=-2), out=out2)


def _update_band(lo, hi, s, z1, z2, du1, du2, r, beta, alpha, work, xp):
    """One ADMM update of rows ``lo:hi``: TV shrinkage, multiplier update, adjoint differences.

    ``s = alpha psi * lambda`` (the current stripe estimate, times the
    relaxation) is read on rows ``lo:hi + 1``; ``z1, z2`` are updated in place
    on ``lo:hi``; ``du1, du2`` hold ``alpha grad u0``; ``r`` gets ``D^T p``
    on ``lo:hi`` except the ``-p2[lo - 1]`` term of row ``lo``, which the
    caller adds (it belongs to the band before).  Returns ``p2``'s last row of
    the band (a view into ``work``).
    """
    b, ny, nx = s.shape
    m = hi - lo
    t1, t2, k, kz, tmp = (w[:, :m] for w in work)
    sb = s[:, lo:hi]
    # t = z - D s  (= grad u0 - multiplier / beta - the relaxed A lambda), D = periodic forward
    # differences; the x difference runs on the flattened band (one aligned 1-D pass), the
    # wrapped column is fixed after
    t1f, sbf = t1.reshape(b, m * nx), sb.reshape(b, m * nx)
    xp.subtract(sbf[:, :-1], sbf[:, 1:], out=t1f[:, :-1])
    xp.subtract(sb[:, :, -1], sb[:, :, 0], out=t1[:, :, -1])
    xp.subtract(sb[:, :-1], sb[:, 1:], out=t2[:, :-1])
    xp.subtract(sb[:, -1], s[:, hi % ny], out=t2[:, -1])
    xp.subtract(z1[:, lo:hi], t1, out=t1)
    xp.subtract(z2[:, lo:hi], t2, out=t2)
    # k = alpha min(1, 1 / (beta |t|)), alpha times 1 - the shrinkage factor: the isotropic TV prox
    # keeps y = (1 - k / alpha) t
    xp.multiply(t1, t1, out=k)
    xp.multiply(t2, t2, out=tmp)
    k += tmp
    xp.sqrt(k, out=k)
    xp.maximum(k, 1.0 / beta, out=k)
    xp.divide(alpha / beta, k, out=k)
    # scaled multiplier m' = -(k / alpha) t; next z' = alpha du - m' + (1 - alpha) y = alpha du + kz t,
    # kz = k + 1 - alpha; the x-update's p = du - y - m', kept times alpha (its spectrum then gives
    # alpha psi * lambda, what t needs), is z' + (k - 1) t
    if alpha == 1.0:
        kz = k
    else:
        xp.add(k, 1.0 - alpha, out=kz)
        k -= 1.0
    for t, z, du in ((t1, z1, du1), (t2, z2, du2)):
        xp.multiply(kz, t, out=tmp)
        xp.add(du[:, lo:hi], tmp, out=z[:, lo:hi])
        if alpha == 1.0:
            xp.subtract(tmp, t, out=t)
        else:
            t *= k
        t += z[:, lo:hi]
    p1, p2 = t1, t2
    # r = D^T p: backward differences (the adjoint of the forward ones)
    rb = r[:, lo:hi]
    rbf, p1f = rb.reshape(b, m * nx), p1.reshape(b, m * nx)
    xp.subtract(p1f[:, 1:], p1f[:, :-1], out=rbf[:, 1:])
    xp.subtract(p1[:, :, 0], p1[:, :, -1], out=rb[:, :, 0])
    rb += p2
    rb[:, 1:] -= p2[:, :-1]
    return p2[:, -1]


def _solve(u, norms, g2, w, *, maxit, cvg_threshold, solver, band, fft, xp):
    """Run the ADMM on a batch ``u`` of scaled slices ``(b, ny, nx)``; return ``(s, iterations)``.

    ``solver`` is an entry of :data:`SOLVERS`.

    ``s`` is the stripe estimate ``psi * lambda`` of each slice (the result is
    ``u - s``).  Slices that meet the stopping rule leave the batch, so each
    slice gets exactly the iterations it would get alone.
    """
    forward, inverse = fft
    beta, alpha, y0_zero, _ = solver
    b, ny, nx = u.shape
    f32 = xp.float32
    # per-slice spectra: |F psi|^2 = norm g2 ; the x-update and the convolution by psi fold into
    # one multiplier K = beta |F psi|^2 / (1 + beta |F psi|^2 w) (the inverse carries the 1 / N)
    c = (beta * norms).astype(f32)[:, None, None]
    bpsi2 = c * g2
    fphi = bpsi2 * w
    fphi += 1
    kx = bpsi2 / fphi
    if cvg_threshold > 0:
        # fx = jx R: Fourier coefficients of lambda, for the stopping rule
        jx = xp.sqrt(bpsi2) / fphi  # proportional to beta |F psi| / fphi: enough for a ratio
        spec_old = None
    del bpsi2, fphi
    du1 = xp.empty_like(u)
    du2 = xp.empty_like(u)
    _forward_differences(u, du1, du2, xp)
    # the multiplier starts at 0; y at grad u0 as in the reference (z = grad u0, p = 0: the first
    # iteration returns s = 0), or at 0 (z = alpha grad u0, p = grad u0: the first one counts)
    if y0_zero:
        du1 *= alpha
        du2 *= alpha
        z1, z2 = du1.copy(), du2.copy()
        r = z1 - xp.roll(z1, 1, axis=-1) + z2 - xp.roll(z2, 1, axis=-2)  # D^T (alpha grad u0)
    else:
        z1, z2 = du1.copy(), du2.copy()
        du1 *= alpha
        du2 *= alpha
        r = xp.zeros_like(u)
    work = [xp.empty((b, band, nx), f32) for _ in range(5)]
    s_out = xp.empty_like(u)
    iterations = np.zeros(b, int)
    active = np.arange(b)
    for it in range(1, maxit + 1):
        spec = forward(r)
        done = np.zeros(len(active), bool) if it < maxit else np.ones(len(active), bool)
        if cvg_threshold > 0 and spec_old is None:
            spec_old = spec.copy()
            cwork = xp.empty((len(active), band, spec.shape[2]), spec.dtype)
            fwork = xp.empty(cwork.shape, f32)
            spec *= kx
        elif cvg_threshold > 0:
            diff, top = _filter_spectrum(spec, kx, spec_old, jx, cwork, fwork, band, xp)
            # the relaxed step is alpha times a plain ADMM step from the same point: the
            # rule measures the plain step, so cvg_threshold means the same for every alpha
            done |= _to_numpy(diff <= alpha * cvg_threshold * top)
        else:
            spec *= kx
        s = inverse(spec)
        if done.any():
            s_out[xp.asarray(active[done])] = s[xp.asarray(done)] / f32(alpha)
            iterations[active[done]] = it
            keep = ~done
            if not keep.any():
                break
            idx = xp.asarray(np.flatnonzero(keep))
            active = active[keep]
            s, z1, z2, du1, du2, r, kx = (a[idx] for a in (s, z1, z2, du1, du2, r, kx))
            if cvg_threshold > 0:
                jx, spec_old, cwork, fwork = (a[idx] for a in (jx, spec_old, cwork, fwork))
            work = [a[idx] for a in work]
        carry = None
        for lo in range(0, ny, band):
            p2_last = _update_band(lo, min(lo + band, ny), s, z1, z2, du1, du2, r, beta, alpha,
                                   work, xp)
            if carry is not None:
                r[:, lo] -= carry
            carry = p2_last.copy()  # the next band overwrites the work arrays
        r[:, 0] -= carry  # the wrap of D^T along y: row 0 takes -p2 of the last row
    return s_out, iterations


def _filter_spectrum(spec, kx, spec_old, jx, cwork, fwork, band, xp):
    """``spec *= kx``, band by band of rows, after the stopping rule's maxima on the band.

    ``fx = jx spec`` are the Fourier coefficients of ``lambda``: returns
    ``max |fx - fx_old|`` and ``max |fx|`` of each slice (``|fx - fx_old| =
    jx |spec - spec_old|``) and sets ``spec_old`` to ``spec``.  ``cwork``,
    ``fwork``: complex and real work arrays of ``band`` rows; in bands the
    ~9 passes stay in the CPU cache.
    """
    b, ny = spec.shape[:2]
    diff = xp.zeros(b, fwork.dtype)
    top = xp.zeros(b, fwork.dtype)
    for lo in range(0, ny, band):
        rows = slice(lo, lo + band)
        sb, ob, jb = spec[:, rows], spec_old[:, rows], jx[:, rows]
        c, f = cwork[:, : sb.shape[1]], fwork[:, : sb.shape[1]]
        xp.subtract(sb, ob, out=c)
        xp.maximum(diff, _weighted_max(c, jb, f, xp), out=diff)
        xp.maximum(top, _weighted_max(sb, jb, f, xp), out=top)
        ob[...] = sb
        sb *= kx[:, rows]
    return diff, top


def _weighted_max(c, w, out, xp):
    """``max |c| w`` of each slice of a complex batch, using ``out`` (real, the shape of ``c``)."""
    xp.abs(c, out=out)
    out *= w
    return out.max(axis=(1, 2))


def _to_numpy(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


@functools.lru_cache(maxsize=8)
def _spectrum_on(xp: ModuleType, filters: FilterKey, shape: tuple[int, int]):
    """:func:`stripe_spectrum` moved to ``xp``'s device once per shape."""
    return tuple(xp.asarray(a) for a in stripe_spectrum(filters, shape))


def slice_scale(stack, *, xp: ModuleType = np):
    """The value VSNR divides each slice of ``stack`` ``(z, y, x)`` by: its maximum, float32.

    When the maximum is not positive, the largest absolute value; 1 for a
    slice of zeros.
    """
    top = stack.max(axis=(1, 2))
    top = xp.where(top > 0, top, xp.abs(stack).max(axis=(1, 2)))
    return xp.where(top > 0, top, 1)


def vsnr(
    stack,
    *,
    filters: Sequence[Mapping[str, Any]],
    maxit: int = 100,
    cvg_threshold: float = 0.0,
    solver: Literal["admm", "fast"] = "admm",
    pad: bool = False,
    pad_mode: str = "wrap",
    batch: int = 1,
    band: int | None = None,
    workers: int = 1,
    xp: ModuleType = np,
    return_iterations: bool = False,
    scale: Sequence[float] | None = None,
    rms: Sequence[float] | None = None,
):
    """Remove stationary (striped) noise from each slice with VSNR.

    Parameters
    ----------
    stack : array, shape (z, y, x) or (y, x)
        Slices to correct (numpy, or an ``xp`` array already on the device).
    filters : sequence of dict
        ``{"name": "Gabor", "noise_level": eta, "sigma": (sx, sy), "theta": deg}``
        or ``{"name": "Dirac", "noise_level": eta}`` (PyStack3D / pyvsnr format).
    maxit : int
        Maximum number of ADMM iterations.
    cvg_threshold : float
        Stop a slice when ``max|fx - fx_old| / max|fx|`` falls to this value;
        0 runs ``maxit`` iterations.
    solver : {"admm", "fast"}
        ``"admm"``: pyvsnr's iterations; ``"fast"``: over-relaxed ADMM with a
        larger penalty, stops closer to the minimiser, in 0.65-0.75x the
        iterations at ``cvg_threshold=1e-2``, about half at 1e-3 (module
        docstring).  Both transform only the spectrum rows the filters reach
        (module docstring, Speed).
    pad : bool
        Pad each slice to fast FFT sizes (:func:`fast_shape`; faster, changes
        the result near the edges).
    pad_mode : str
        ``numpy.pad`` mode used when padding.
    batch : int
        Slices solved together (vectorised; a GPU wants many, a CPU one).
    band : int, optional
        Rows per band of the elementwise passes; default
        :data:`BAND_ELEMENTS` pixels' worth with numpy, the whole slice
        otherwise.  Does not change the result.
    workers : int
        Threads of each scipy FFT (numpy only; 1 inside dask tasks).
    xp : module
        ``numpy`` or ``cupy``.
    return_iterations : bool
        Also return the number of iterations each slice ran.
    scale : sequence of float, optional
        The value each slice is divided by before the solve (module docstring,
        Normalisation); default: the slice's maximum.  A tile of a larger
        slice passes the slice's, so its TV threshold is the slice's.
    rms : sequence of float, optional
        The RMS of each slice once divided by ``scale``, which sets the
        filters' strength; default: the slice's own.  A tile of a larger slice
        passes the slice's, so the tile is corrected as strongly as the slice.

    Returns
    -------
    out : array, float32, the shape of ``stack``
        Corrected slices, on the device of ``stack``.
    iterations : numpy.ndarray of int, shape (z,)
        Only with ``return_iterations``.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.random.default_rng(0).random((64, 48)).astype(np.float32)
    >>> img += np.linspace(0, 1, 48)[None, :] > 0.5  # a vertical step...
    >>> out = vsnr(img, filters=[{"name": "Gabor", "noise_level": 20,
    ...                           "sigma": (0.5, 200), "theta": 0}], maxit=10)
    >>> out.shape, out.dtype
    ((64, 48), dtype('float32'))
    """
    squeeze = stack.ndim == 2
    stack3 = stack[None] if squeeze else stack
    nz, ny, nx = stack3.shape
    shape = fast_shape((ny, nx)) if pad else (ny, nx)
    # half the padding on each side: both edges keep their periodic neighbours over the
    # first half-pad pixels, as in the unpadded model, and the new wrap falls in the padding
    before = ((shape[0] - ny) // 2, (shape[1] - nx) // 2)
    widths = ((0, 0), (before[0], shape[0] - ny - before[0]), (before[1], shape[1] - nx - before[1]))
    crop = (slice(None), slice(before[0], before[0] + ny), slice(before[1], before[1] + nx))
    if solver not in SOLVERS:
        raise ValueError(f"solver = {solver!r}: expected one of {', '.join(map(repr, SOLVERS))}")
    key = filter_key(filters)
    g2, w = _spectrum_on(xp, key, shape)
    rows = spectrum_rows(key, shape, SOLVERS[solver].row_tolerance)
    if rows is not None:
        g2, w = g2[xp.asarray(rows)], w[xp.asarray(rows)]
    fft = _transforms(xp, workers, shape, rows)
    band = int(band or (max(1, BAND_ELEMENTS // shape[1]) if xp is np else shape[0]))
    on_host = isinstance(stack3, np.ndarray)
    out = (np if on_host else xp).empty((nz, ny, nx), np.float32)
    iterations = np.zeros(nz, int)
    for i in range(0, nz, max(1, int(batch))):
        # C order: the band updates write through reshaped views, which would be copies otherwise
        u = xp.ascontiguousarray(xp.asarray(stack3[i : i + batch], dtype=xp.float32))
        if scale is None:
            # the reference scales each slice by its maximum (norm=False): the TV threshold is relative
            div = slice_scale(u, xp=xp)[:, None, None]
        else:
            div = xp.asarray(scale[i : i + batch], dtype=xp.float32)[:, None, None]
        u = u / div  # a new array: the caller's stays untouched
        if rms is None:
            norms = xp.sqrt((u * u).sum(axis=(1, 2), dtype=xp.float64))
        else:
            norms = xp.asarray(rms[i : i + batch], dtype=xp.float64) * math.sqrt(ny * nx)
        if shape != (ny, nx):
            u = xp.pad(u, widths, mode=pad_mode)
            norms *= math.sqrt(shape[0] * shape[1] / (ny * nx))  # same RMS: same strength
        s, its = _solve(u, norms, g2, w, maxit=maxit, cvg_threshold=cvg_threshold,
                        solver=SOLVERS[solver], band=band, fft=fft, xp=xp)
        res = u[crop] - s[crop]
        res *= div
        out[i : i + batch] = _to_numpy(res) if on_host else res
        iterations[i : i + batch] = its
    out = out[0] if squeeze else out
    return (out, iterations) if return_iterations else out
