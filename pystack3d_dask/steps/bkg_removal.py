"""bkg_removal: fit a polynomial background robustly and subtract it.

The basis comes from ``poly_basis`` (parsed, never evaluated) or from
``orders`` and ``cross_terms``; coordinates, sampling and the fit follow
:mod:`pystack3d_dask.kernels.polyfit`.

Global state (computed first, in one read of the stack):

``dim = 3``
    One fit over the subsampled stack.  Only the sampled voxels reach the
    fit: each chunk is reduced to the sums and counts of its samples by a
    dask task, so the fit holds about 40 bytes per sampled voxel (values,
    indices, residuals, weights; 36 B measured by the benchmark), never the
    stack.  ``max_samples`` bounds that memory whatever the stack's size: when
    the skip factors would give more samples, all three grow by the same ratio
    until they do not, and a warning names the factors used.  The sample grid depends on the stack's shape only,
    never on its chunking or the scheduler.
``dim = 2``
    One fit per slice, inside the chunk's task; coefficients per slice.

State keys: ``terms`` (basis term names), ``coefs`` (``(nterms,)`` for
``dim = 3``, ``(nz, nterms)`` for ``dim = 2``), ``offset`` (the level added
back by ``preserve_avg``: one number, or one per slice), ``dim``, and for
``dim = 3`` the ``skip_factors`` the fit used.

Output (lazy, float32): ``input - (background - constant term) + offset`` on
the fitted pixels (finite and within ``[threshold_min, threshold_max]``);
other pixels are left unchanged.

``preserve_avg``: ``offset`` is the mean of ``background - constant term``
over every fitted pixel of the stack (all of them, not only the samples), so
the output's mean over those pixels equals the input's, before the engine
rounds and clips to the input dtype.  With ``dim = 2`` (where SPEC calls it
unsuitable) the same holds slice by slice.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import ClassVar, Literal

import dask
import numpy as np

from pystack3d_dask.config import check
from pystack3d_dask.errors import ConfigError, StepError
from pystack3d_dask.kernels.polyfit import (
    Samples,
    Term,
    basis_from_orders,
    bin_sums,
    coordinates,
    moments,
    parse_basis,
    remove_background,
    robust_fit,
    sample_coordinates,
    sample_sums,
    xy_coefficients,
)
from pystack3d_dask.lazy import lazy_module
from pystack3d_dask.steps.base import State, Step, StepContext, map_slices, run_step

da = lazy_module("dask.array")

SECTION = "bkg_removal"


@dataclasses.dataclass(frozen=True)
class Params:
    #: older PyStack3D files call threshold_min "threshold"
    ALIASES: ClassVar[dict[str, str]] = {"threshold": "threshold_min"}

    #: explicit basis, e.g. "1 + x + y + x*y + x**2 + z" (or give ``orders``)
    poly_basis: str | None = None
    #: [ox, oy] or [ox, oy, oz]: highest power of each variable; sets dim = len(orders)
    orders: tuple[int, ...] | None = None
    #: 2 (one fit per slice) or 3 (one fit over the stack); with poly_basis, default 3
    dim: int | None = None
    #: with orders: every product of powers up to the orders (true) or pure powers only (false)
    cross_terms: bool = False
    #: [sx, sy, sz]: the fit uses every s-th column, row and slice (sz unused with dim = 2)
    skip_factors: tuple[int, ...] = (10, 10, 10)
    #: each sample is the mean of its skip block instead of one pixel
    skip_averaging: bool = False
    #: pixels below (above) are excluded from the fit and left unchanged (inclusive bounds)
    threshold_min: float | None = None
    threshold_max: float | None = None
    #: robust M-estimator (statsmodels' norm of the same name) or plain least squares
    weight_func: Literal["HuberT", "Hampel", "None"] = "HuberT"
    #: keep the mean over the fitted pixels (see the module docstring)
    preserve_avg: bool = False
    #: dim = 3: most sampled voxels the fit holds (about 40 B each); 0 = no limit.  Beyond,
    #: the three skip factors grow by the same ratio
    max_samples: int = 20_000_000

    def __post_init__(self):
        if (self.poly_basis is None) == (self.orders is None):
            given = "both" if self.poly_basis is not None else "neither"
            raise ConfigError(f"[{SECTION}] needs exactly one of 'poly_basis' and 'orders' ({given} given).")
        if self.orders is not None:
            check(len(self.orders) in (2, 3) and min(self.orders) >= 0, SECTION, "orders", list(self.orders),
                  "expected 2 or 3 non-negative integers [ox, oy(, oz)]")
            check(self.dim in (None, len(self.orders)), SECTION, "dim", self.dim,
                  f"with orders = {list(self.orders)} the dimension is len(orders) = {len(self.orders)}")
        check(self.dim in (None, 2, 3), SECTION, "dim", self.dim, "expected 2 or 3")
        check(len(self.skip_factors) in (2, 3) and min(self.skip_factors) >= 1, SECTION, "skip_factors",
              list(self.skip_factors), "expected 2 or 3 integers >= 1 [sx, sy(, sz)]")
        check(self.max_samples >= 0, SECTION, "max_samples", self.max_samples,
              "expected an integer >= 0 (0: no limit)")
        check(self.fit_dim == 2 or len(self.skip_factors) == 3, SECTION, "skip_factors",
              list(self.skip_factors), "a 3-D fit needs three factors [sx, sy, sz]")
        if self.threshold_min is not None and self.threshold_max is not None:
            check(self.threshold_min <= self.threshold_max, SECTION, "threshold_max", self.threshold_max,
                  f"expected >= threshold_min = {self.threshold_min}")
        self.basis()  # a malformed basis fails now, not in the middle of a run

    @property
    def fit_dim(self) -> int:
        """2 or 3: ``len(orders)``, else ``dim`` (default 3)."""
        return len(self.orders) if self.orders is not None else (self.dim or 3)

    def basis(self) -> tuple[Term, ...]:
        """The basis terms."""
        if self.orders is not None:
            return basis_from_orders(self.orders, cross_terms=self.cross_terms)
        return parse_basis(self.poly_basis, dim=self.fit_dim, key=f"[{SECTION}] poly_basis")

    @property
    def thresholds(self) -> dict[str, float | None]:
        return {"threshold_min": self.threshold_min, "threshold_max": self.threshold_max}


def _top_xy(terms: tuple[Term, ...]) -> tuple[int, int]:
    """Highest powers (of y, of x) in the basis."""
    top = np.max([t.exponents for t in terms], axis=0)
    return int(top[1]), int(top[0])


def _sample_sums(stack: da.Array, params: Params, skip_yx: tuple[int, int]) -> da.Array:
    """Lazy ``(z, ny, nx, 2)`` sums and counts of the samples of every (sampled) slice."""
    sy, sx = skip_yx
    ny, nx = math.ceil(stack.shape[1] / sy), math.ceil(stack.shape[2] / sx)
    return stack.map_blocks(
        sample_sums, skip_yx=(sy, sx), averaging=params.skip_averaging, **params.thresholds,
        chunks=(stack.chunks[0], (ny,), (nx,), (2,)), new_axis=3, dtype=np.float64,
        meta=np.empty((0, 0, 0, 0)),
    )


def _sum_z_blocks(sums: da.Array, size: int) -> da.Array:
    """Add the per-slice sums by blocks of ``size`` slices (chunks realigned on the blocks)."""
    n = sums.shape[0]
    target = size * max(1, round(max(sums.chunks[0]) / size))
    chunks = (target,) * (n // target) + ((n % target,) if n % target else ())
    sums = sums.rechunk({0: chunks})
    return sums.map_blocks(bin_sums, size, chunks=(tuple(-(-c // size) for c in chunks),) + sums.chunks[1:],
                           dtype=sums.dtype)


def _fit_error(where: str, exc: StepError, params: Params) -> StepError:
    return StepError(
        f"bkg_removal: {where}: {exc} (threshold_min = {params.threshold_min}, "
        f"threshold_max = {params.threshold_max}, skip_factors = {list(params.skip_factors)})"
    )


def _within_budget(shape: tuple[int, int, int], skip: tuple[int, ...], max_samples: int) -> tuple[int, int, int]:
    """Skip factors ``(sx, sy, sz)`` that leave at most ``max_samples`` grid points.

    All three grow by the same ratio (rounded up, in steps of 5 %), so the samples thin
    out evenly along every axis: thinning one axis alone lets the content along it alias
    into the fit (a few sampled slices turn the blobs' slice-to-slice variation into z terms).
    """
    nz, h, w = shape

    def scaled(ratio: float) -> tuple[int, int, int]:
        sx, sy, sz = (math.ceil(s * ratio - 1e-9) for s in skip)
        return sx, sy, sz

    def count(sx: int, sy: int, sz: int) -> int:
        return math.ceil(nz / sz) * math.ceil(h / sy) * math.ceil(w / sx)

    ratio = 1.0
    while max_samples and count(*scaled(ratio)) > max_samples:  # ends: 1 voxel once s >= n
        ratio *= 1.05
    factors = scaled(ratio)
    if ratio > 1:
        warnings.warn(
            f"[{SECTION}] skip_factors = {list(skip)} would sample {count(*skip):,} voxels, more than "
            f"max_samples = {max_samples:,}: the 3-D fit uses skip_factors = {list(factors)} "
            f"({count(*factors):,} voxels).", stacklevel=4)
    return factors


def _fit_3d(stack: da.Array, params: Params, ctx: StepContext) -> State:
    terms = params.basis()
    nz, h, w = stack.shape
    sx, sy, sz = _within_budget(stack.shape, params.skip_factors, params.max_samples)
    if params.skip_averaging:
        sums = _sum_z_blocks(_sample_sums(stack, params, (sy, sx)), sz)
    else:
        sums = _sample_sums(stack[::sz], params, (sy, sx))
    lazy = {"sums": sums}
    if params.preserve_avg:
        lazy["moments"] = stack.map_blocks(
            moments, top=_top_xy(terms), **params.thresholds, dtype=np.float64,
            chunks=(stack.chunks[0],) + tuple((t + 1,) for t in _top_xy(terms)),
        )
    (computed,) = dask.compute(lazy)
    grid = tuple(sample_coordinates(n, s, averaging=params.skip_averaging) for n, s in zip((nz, h, w), (sz, sy, sx)))
    samples = Samples.from_sums(computed.pop("sums"), grid)
    try:
        coefs = robust_fit(samples, terms, weight_func=params.weight_func)
    except StepError as exc:
        raise _fit_error(f"slices {ctx.first_index}-{ctx.first_index + nz - 1}", exc, params) from None
    offset = 0.0
    if params.preserve_avg:
        mom = computed["moments"]
        total = sum((xy_coefficients(coefs, terms, z) * m).sum() for z, m in zip(coordinates(nz), mom))
        offset = float(total / mom[:, 0, 0].sum())
    return {"dim": 3, "terms": [t.name for t in terms], "coefs": coefs, "offset": offset,
            "skip_factors": [sx, sy, sz]}


def _fit_slices(block: np.ndarray, *, params: Params, first_index: int, block_info=None) -> np.ndarray:
    """Per slice of a block: the coefficients, then the preserve_avg offset, ``(z, nterms + 1)``."""
    terms = params.basis()
    sx, sy = params.skip_factors[:2]
    h, w = block.shape[1:]
    grid = (np.zeros(1),) + tuple(sample_coordinates(n, s, averaging=params.skip_averaging)
                                  for n, s in ((h, sy), (w, sx)))
    start = block_info[0]["array-location"][0][0] if block_info else 0
    out = np.zeros((block.shape[0], len(terms) + 1))
    for k, img in enumerate(block):
        sums = sample_sums(img[None], skip_yx=(sy, sx), averaging=params.skip_averaging, **params.thresholds)
        try:
            out[k, :-1] = robust_fit(Samples.from_sums(sums, grid), terms, weight_func=params.weight_func)
        except StepError as exc:
            raise _fit_error(f"slice {first_index + start + k}", exc, params) from None
        if params.preserve_avg:
            m = moments(img[None], top=_top_xy(terms), **params.thresholds)[0]
            out[k, -1] = (xy_coefficients(out[k, :-1], terms, 0.0) * m).sum() / m[0, 0]
    return out


def _fit_2d(stack: da.Array, params: Params, ctx: StepContext) -> State:
    terms = params.basis()
    table = stack.map_blocks(
        _fit_slices, params=params, first_index=ctx.first_index, drop_axis=2,
        chunks=(stack.chunks[0], (len(terms) + 1,)), dtype=np.float64, meta=np.empty((0, 0)),
    )
    (table,) = dask.compute(table)
    return {"dim": 2, "terms": [t.name for t in terms], "coefs": table[:, :-1], "offset": table[:, -1]}


def compute_state(stack: da.Array, params: Params, ctx: StepContext) -> State:
    """Fit the background: one set of coefficients (dim 3) or one per slice (dim 2)."""
    return (_fit_3d if params.fit_dim == 3 else _fit_2d)(stack, params, ctx)


def apply(stack: da.Array, params: Params, state: State, ctx: StepContext) -> da.Array:
    """Lazy ``input - (background - constant) + offset`` on the fitted pixels, float32."""
    terms = params.basis()
    nz = stack.shape[0]
    coefs = np.broadcast_to(np.asarray(state["coefs"], np.float64), (nz, len(terms)))
    offset = np.broadcast_to(np.asarray(state["offset"], np.float64), (nz,))
    z = coordinates(nz) if params.fit_dim == 3 else np.zeros(nz)
    return map_slices(stack, remove_background, np.column_stack([z, offset, coefs]),
                      dtype=np.result_type(stack.dtype, np.float32), terms=terms, **params.thresholds)


STEP = Step(name=SECTION, Params=Params, apply=apply, compute_state=compute_state)


def bkg_removal(stack, **params) -> tuple[da.Array, State]:
    """Remove a polynomial background from ``stack``; lazy result and fitted state.

    Parameters
    ----------
    stack : array-like, shape (z, y, x)
        numpy, dask or Zarr array (uint8, uint16, float32, ...).
    poly_basis : str, optional
        Explicit basis, e.g. ``"1 + x + y + x*y + x**2 + z"`` (with ``dim``).
    orders : sequence of int, optional
        ``(ox, oy)`` or ``(ox, oy, oz)``; the fit's dimension is ``len(orders)``.
        Exactly one of ``poly_basis`` and ``orders`` is required.
    dim : {2, 3}, optional
        With ``poly_basis``: one fit per slice (2) or over the stack (3, default).
    cross_terms : bool
        With ``orders``: all products of powers (True) or pure powers (False, default).
    skip_factors : (sx, sy, sz)
        Use every s-th column, row and slice in the fit (default ``(10, 10, 10)``).
    skip_averaging : bool
        Each sample is its block's mean (default False).
    threshold_min, threshold_max : float, optional
        Pixels outside ``[min, max]`` are excluded from the fit and left unchanged
        (``threshold`` is accepted for ``threshold_min``).
    weight_func : {"HuberT", "Hampel", "None"}
        Robust norm of the fit (default ``"HuberT"``).
    preserve_avg : bool
        Keep the mean over the fitted pixels (default False).
    max_samples : int
        ``dim = 3``: most sampled voxels the fit holds (default 20 000 000, about
        0.8 GB; 0: no limit); beyond, the three skip factors grow by the same
        ratio, with a warning naming the factors used.
    zpos, channel, nproc, state, cast
        See :func:`pystack3d_dask.steps.base.run_step`.

    Returns
    -------
    result : dask.array.Array
        Corrected stack, cast back to the input dtype.
    state : dict
        ``terms``, ``coefs``, ``offset``, ``dim`` (see the module docstring).

    Raises
    ------
    ConfigError
        Invalid parameters (malformed basis, dim/orders mismatch, ...).
    StepError
        No (or too few) pixels to fit in a slice (dim 2) or in the stack (dim 3).

    Examples
    --------
    >>> import numpy as np
    >>> y, x = np.mgrid[:32, :32] / 31
    >>> stack = np.stack([100 + 20 * x * y] * 4).astype(np.float32)
    >>> out, state = bkg_removal(stack, orders=(1, 1), cross_terms=True, skip_factors=(2, 2))
    >>> state["terms"]
    ['1', 'x', 'y', 'x*y']
    >>> bool(np.allclose(out.compute(), 100, atol=1e-3))
    True
    """
    return run_step(STEP, stack, **params)
