"""VSNR on slices too large for memory: x-tiles with overlap, blended seams (``xp``-generic).

One VSNR slice in flight holds ~14 float32 copies of itself (16 with early
stopping, :func:`vsnr_bytes`).  Curtains are vertical, so a slice can be cut
along x into tiles of whole columns, each solved alone by
:func:`pystack3d_dask.kernels.vsnr.vsnr`, and put back together.  What makes a
tile's solution agree with the whole slice's:

* **the slice's normalisation.**  Every tile is divided by the *slice's*
  maximum and corrected with the *slice's* strength (its RMS sets ``alpha_i``,
  :mod:`~pystack3d_dask.kernels.vsnr`, Normalisation), so the TV threshold and
  the correction strength are the slice's.  The folded filter's spectrum
  ``|F psi|^2`` is then the same function of frequency on the tile's grid as
  on the slice's (measured: 1e-4 apart), so a tile solves the slice's problem
  restricted to its columns, with periodic boundaries at its own edges.
* **real neighbours as overlap.**  Each tile is extended by ``overlap``
  columns of the slice on both sides, taken periodically (the first tile's
  left neighbours are the slice's last columns), so the slice's own periodic
  boundary is seen as in the whole-slice solve.  Tiles all have one width,
  a fast FFT length of the slice's parity (a Gabor filter is sampled half a
  pixel off on a grid of the other parity, :func:`~pystack3d_dask.kernels.vsnr.fast_shape`):
  one spectrum and one FFT plan serve every tile.
* **blended seams.**  Around each seam the two tiles are blended with linear
  weights over ``overlap`` columns (``overlap / 2`` on each side), so each
  tile contributes only where it is at least ``overlap / 2`` from its edges.
* **the slice's stopping point.** With ``cvg_threshold > 0`` every tile runs
  one count (seams join iterates of the same step), picked by the stopping
  rule on a *proxy* of the whole slice: the slice with every ``factor`` rows
  averaged into one (:func:`binned_rows`; the fewest that make it no larger
  than a tile, :func:`proxy_factor`), solved with each Gabor's y axis shrunk
  as much (:func:`binned_filters`) and the slice's normalisation. Curtains
  are vertical and long, so the proxy keeps what the rule weighs (the low
  vertical frequencies where the filter lives, every column, the slice's own
  periodic boundary), which a tile does not: the rule is a ratio of maxima
  over Fourier coefficients, and in a tile a few columns (the slice's
  left/right step, inside the first tile) weigh ``nx / width`` times more.
  Measured (``benchmarks/bench_vsnr_tiles.py``, curtained slices, Gabor 20,
  [0.5, 200], ``cvg_threshold = 1e-2``; slice / proxy / first-tile counts,
  relative RMS from the untiled result beyond 32 px of the outer edges with
  the proxy's and with the first tile's count): 2048 x 2048 in 4 tiles, 15 /
  15 / 31, 1.5e-4 vs 3.9e-3; over 15 slices from 512 x 768 to 4096 x 1024
  (2-4 tiles, factor 2-3, with and without added noise) the proxy's count is
  the slice's in 7, one off in 5, two or three off in 3 (the first tile's:
  in 2, up to 16 off), and the result is within 1e-3 of the untiled one in
  12 (at most 1.7e-3) vs 7 (at most 3.9e-3); on the demo's 8 curtained
  slices as the chain hands them over (1024 x 1024 to 4096 x 1024, 4 and 8
  tiles) one off at most, within 7.7e-4 (first tile: up to 16 off, 5.0e-3);
  with ``theta = 10``, ``sigma = [3, 200]`` or a Dirac added (1024 x 1536, 3
  tiles, 2 slices each) up to two off, within 7.6e-4 (first tile: up to 28
  off, 6.5e-3). It is not exact: near its threshold the rule's ratio falls
  by a few % per iteration and wanders by as much, so a slightly different
  problem crosses it a few iterations apart, and at 1e-2 the result still
  moves by up to 8e-4 per iteration. An exact count would need the slice's
  Fourier coefficients at every iteration, i.e. every tile's state at once
  (or each tile run twice). The proxy costs one solve of ``1 / factor`` of
  the slice (at 2048 x 2048 in 4 tiles, factor 3: +20-30 % CPU time),
  within the tiles' memory (peak 0.88 of the budget, tracemalloc).

The overlap (:func:`default_overlap`).  A column's correction depends on its
neighbours through the ADMM's x-update ``(1 + beta |F psi|^2 |F d|^2)^-1``: at
low frequencies a screened Poisson equation, whose Green's function decays
along x over ``ell = sqrt(beta max |F psi|^2)`` columns (at most, for a slice
scaled to 1: 15 px for Gabor ``noise_level = 20, sigma = [0.5, 200]``;
``sqrt(noise_level)``-proportional; 37 px for ``sigma = [3, 200]``).  The
overlap is ``10 ell`` plus three times the filter's own extent along x
(``sqrt(sx^2 cos^2 theta + sy^2 sin^2 theta)``, its standard deviation
there): 153 px for the usual Gabor.  Measured at 1024 x 1024, 4 tiles,
30 iterations, relative RMS from the untiled result beyond 32 px of the outer
edges, at overlaps of 8.5 and 12.7 ``ell``: 4.1e-4 and 1.4e-4 (Gabor 20,
[0.5, 200], 0); 1.8e-5 at 17 ``ell`` (noise_level 5); 3.7e-4 and 2.3e-4
(theta = 10); but 2.8e-3 and 8.5e-4 for ``sigma = [0.5, 20]`` (a short
filter couples columns more than ``ell`` says) and 3.2e-3 at 3.4-5 ``ell``
(``sigma = [3, 200]``).  At 2048 x 2048 (Gabor 20, [0.5, 200], 0, 30
iterations): 3.8e-3, 6.8e-4, 5.0e-4 and 3.6e-5 at 64, 128, 153 and 256 px.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, Literal

import numpy as np

from pystack3d_dask.kernels.vsnr import SOLVERS, fast_shape, filter_key, slice_scale, stripe_spectrum, vsnr

#: the overlap in coupling lengths ``ell`` (module docstring)
COUPLING_LENGTHS = 10.0
#: ... plus this many standard deviations of the filter along x
FILTER_WIDTHS = 3.0
#: peak float32 slice-sized arrays of one :func:`vsnr` call (output and cached spectrum included,
#: input excluded), without and with early stopping (which keeps the previous Fourier coefficients
#: and their difference); measured with tracemalloc on 512 x 512 and 1024 x 700: 13.0-13.8 and
#: 14.6-15.7
VSNR_ARRAYS = (14, 16)
#: rows over which the slice's norm is summed at a time (bounds the float64 temporary)
_NORM_ROWS = 256


def vsnr_bytes(shape: tuple[int, int], *, cvg_threshold: float = 0.0, pad: bool = False) -> int:
    """Peak bytes one :func:`vsnr` call takes for a float32 slice of ``shape``, its input excluded.

    The whole spectrum's: an upper bound where the solver transforms only some rows (about 0.75x).
    """
    ny, nx = fast_shape(shape) if pad else shape
    return 4 * ny * nx * VSNR_ARRAYS[cvg_threshold > 0]


def default_overlap(filters: Sequence[Mapping[str, Any]], *, ny: int,
                    solver: Literal["admm", "fast"] = "admm") -> int:
    """Columns each tile borrows from each neighbour for ``filters`` on slices of ``ny`` rows.

    ``COUPLING_LENGTHS`` coupling lengths ``ell = sqrt(beta max |F psi|^2)``
    (the strongest correction, a slice scaled to 1) plus ``FILTER_WIDTHS``
    times the widest filter's standard deviation along x (module docstring).
    """
    key = filter_key(filters)
    # |F psi|^2 does not depend on the grid's width (module docstring): a narrow grid is enough,
    # as long as it holds the filters' x extent
    extent = max((math.hypot(sx * math.cos(math.radians(t)), sy * math.sin(math.radians(t)))
                  for name, _, sx, sy, t in key if name == "Gabor"), default=0.0)
    grid = fast_shape((ny, max(64, 2 * math.ceil(8 * extent))))
    g2, _ = stripe_spectrum(key, grid)
    ell = math.sqrt(SOLVERS[solver].beta * float(g2.max()) * math.sqrt(grid[0] * grid[1]))
    return math.ceil(COUPLING_LENGTHS * ell + FILTER_WIDTHS * extent)


def tile_width(nx: int, *, tiles: int, overlap: int) -> int:
    """Width of every tile: the widest core plus the overlap on both sides, rounded up to a fast
    FFT length of ``nx``'s parity (a wider overlap only helps)."""
    n = math.ceil(nx / tiles) + 2 * overlap
    return fast_shape((1, n + (n - nx) % 2))[1]


def tiled_bytes(shape: tuple[int, int], *, tiles: int, overlap: int, cvg_threshold: float = 0.0,
                pad: bool = False) -> int:
    """Peak bytes to correct one float32 slice of ``shape`` (the input included) in ``tiles``.

    ``tiles = 1``: the slice and :func:`vsnr` on it.  More: the slice, the
    result, one tile and :func:`vsnr` on it.
    """
    ny, nx = shape
    if tiles == 1:
        return 4 * ny * nx + vsnr_bytes(shape, cvg_threshold=cvg_threshold, pad=pad)
    w = tile_width(nx, tiles=tiles, overlap=overlap)
    return 4 * ny * (2 * nx + w) + vsnr_bytes((ny, w), cvg_threshold=cvg_threshold, pad=pad)


def plan_tiles(shape: tuple[int, int], *, budget: int, overlap: int, cvg_threshold: float = 0.0,
               pad: bool = False) -> int:
    """The fewest tiles whose peak memory (:func:`tiled_bytes`) fits ``budget`` bytes (1: untiled).

    Raises
    ------
    ValueError
        When no tiling fits (even the narrowest tiles, two columns of core
        each, need more): the message gives the least budget that works.
    """
    ny, nx = shape
    need = tiled_bytes(shape, tiles=1, overlap=overlap, cvg_threshold=cvg_threshold, pad=pad)
    if need <= budget:
        return 1
    least = need
    for tiles in range(2, nx // 2 + 1):
        need = tiled_bytes(shape, tiles=tiles, overlap=overlap, cvg_threshold=cvg_threshold, pad=pad)
        if need <= budget:
            return tiles
        least = min(least, need)
    raise ValueError(f"budget = {budget} bytes is too small for a VSNR slice of {ny} x {nx}: even "
                     f"the narrowest tiles need {least} bytes ({least / 2**20:.0f} MiB)")


def _slice_rms(img, scale, xp) -> float:
    """RMS of ``img / scale``, summed in float64 over bands of rows (no slice-sized float64)."""
    total = 0.0
    for lo in range(0, img.shape[0], _NORM_ROWS):
        band = img[lo : lo + _NORM_ROWS] / scale
        total += float((band * band).sum(dtype=xp.float64))
    return math.sqrt(total / img.size)


def proxy_factor(ny: int, nx: int, *, width: int) -> int:
    """Rows binned into one in the stopping-rule proxy of a ``ny x nx`` slice cut in tiles of
    ``width`` columns: the fewest that make it no larger than a tile (so it fits where a tile does)."""
    return min(ny, -(-nx // width))


def binned_rows(img, factor: int, *, xp: ModuleType = np):
    """``img`` ``(y, x)`` with every ``factor`` rows averaged into one (the last group may be shorter)."""
    ny, nx = img.shape
    full = ny // factor
    out = xp.empty((-(-ny // factor), nx), xp.float32)
    xp.mean(img[: full * factor].reshape(full, factor, nx), axis=1, out=out[:full])
    if full < out.shape[0]:
        xp.mean(img[full * factor :], axis=0, out=out[full])
    return out


def binned_filters(filters: Sequence[Mapping[str, Any]], factor: int) -> list[dict[str, Any]]:
    """``filters`` on a grid whose rows are ``factor`` rows of the slice's: each Gabor's Gaussian
    with its y axis shrunk ``factor`` times (re-diagonalised when tilted); a Dirac stays a Dirac."""
    out = []
    for f in filters:
        if f["name"] != "Gabor" or factor == 1:
            out.append(dict(f))
            continue
        sx, sy = f["sigma"]
        t = math.radians(f.get("theta", 0.0))
        rot = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
        # quadratic form of the Gaussian in (x, y) (gabor()), then in (x, y / factor)
        form = rot.T @ np.diag([sx**-2.0, sy**-2.0]) @ rot
        form = np.diag([1.0, factor]) @ form @ np.diag([1.0, factor])
        eig, vec = np.linalg.eigh(form)
        axis = int(np.argmax(np.abs(vec[0])))  # the eigenvector nearest the x axis plays x
        vx = vec[:, axis] * np.sign(vec[0, axis])
        out.append({**f, "sigma": (float(eig[axis] ** -0.5), float(eig[1 - axis] ** -0.5)),
                    "theta": math.degrees(math.atan2(vx[1], vx[0]))})
    return out


def vsnr_tiles(
    stack,
    *,
    tiles: int,
    overlap: int,
    filters: Sequence[Mapping[str, Any]],
    maxit: int = 100,
    cvg_threshold: float = 0.0,
    solver: Literal["admm", "fast"] = "admm",
    pad: bool = False,
    workers: int = 1,
    xp: ModuleType = np,
    return_iterations: bool = False,
):
    """VSNR on each slice, solved in ``tiles`` x-tiles that overlap and are blended.

    Parameters
    ----------
    stack : array, shape (z, y, x) or (y, x)
        Slices to correct (float32 preferred: it is not copied whole).
    tiles : int
        Tiles per slice, 2 to ``x // 2`` (:func:`plan_tiles` picks it from a
        memory budget).
    overlap : int
        Columns each tile takes from each neighbour, >= 0
        (:func:`default_overlap`; module docstring for what it buys).
    filters, maxit, cvg_threshold, solver, pad, workers, xp
        As for :func:`~pystack3d_dask.kernels.vsnr.vsnr`.
    return_iterations : bool
        Also return the iterations each slice ran: ``maxit``, or the count
        its proxy's stopping rule picked (module docstring), for all its tiles.

    Returns
    -------
    out : array, float32, the shape of ``stack``
        Corrected slices.
    iterations : numpy.ndarray of int, shape (z,)
        Only with ``return_iterations``.

    Raises
    ------
    ValueError
        ``tiles`` or ``overlap`` out of range.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.random.default_rng(0).random((64, 96)).astype(np.float32)
    >>> out = vsnr_tiles(img, tiles=2, overlap=16, maxit=10,
    ...                  filters=[{"name": "Dirac", "noise_level": 1}])
    >>> out.shape, out.dtype
    ((64, 96), dtype('float32'))
    """
    squeeze = stack.ndim == 2
    stack3 = stack[None] if squeeze else stack
    nz, ny, nx = stack3.shape
    if isinstance(tiles, bool) or not isinstance(tiles, int) or not 2 <= tiles <= nx // 2:
        raise ValueError(f"tiles = {tiles!r}: expected an integer from 2 to {nx // 2} "
                         f"(half the {nx} columns)")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"overlap = {overlap!r}: expected an integer >= 0")
    width = tile_width(nx, tiles=tiles, overlap=overlap)
    seams = [i * nx // tiles for i in range(tiles + 1)]
    # blend over overlap columns centred on each seam, at most a core's: weights stay inside a tile
    half = min(overlap // 2, min(b - a for a, b in zip(seams, seams[1:])) // 2)
    factor = proxy_factor(ny, nx, width=width)
    proxy = binned_filters(filters, factor)
    kw = dict(solver=solver, pad=pad, workers=workers, xp=xp, return_iterations=True)
    out = xp.empty((nz, ny, nx), xp.float32)
    iterations = np.zeros(nz, int)
    for k in range(nz):
        img = xp.asarray(stack3[k], dtype=xp.float32)
        scale = slice_scale(img[None], xp=xp)
        rms = [_slice_rms(img, scale, xp)]
        res = out[k]
        res[...] = 0
        count = maxit
        if cvg_threshold > 0:
            # the slice's stopping point, from its proxy (module docstring)
            _, its = vsnr(binned_rows(img, factor, xp=xp), filters=proxy, maxit=maxit,
                          cvg_threshold=cvg_threshold, scale=scale, rms=rms, **kw)
            count = int(its[0])
        for i in range(tiles):
            start = seams[i] - overlap
            cols = xp.asarray((start + np.arange(width)) % nx)
            tile, _ = vsnr(img[:, cols], filters=filters, maxit=count, scale=scale, rms=rms, **kw)
            # linear weights, complementary across each seam, at pixel centres
            pos = np.arange(seams[i] - half, seams[i + 1] + half)
            weight = np.ones(len(pos))
            if half:
                weight = np.minimum(np.clip((pos + 0.5 - seams[i] + half) / (2 * half), 0, 1),
                                    np.clip((seams[i + 1] + half - pos - 0.5) / (2 * half), 0, 1))
            used = xp.asarray(pos % nx)
            res[:, used] += tile[:, xp.asarray(pos - start)] * xp.asarray(weight, xp.float32)
            del tile
        iterations[k] = count
    out = out[0] if squeeze else out
    return (out, iterations) if return_iterations else out
