"""Polynomial backgrounds: the basis, the sampling, the robust fit and the removal.

Conventions (used by :mod:`pystack3d_dask.steps.bkg_removal`)
--------------------------------------------------------------
* Coordinates are normalised to ``[0, 1]``: ``x = column / (W - 1)``,
  ``y = row / (H - 1)`` (row 0 is the first row of the array, i.e. the top of
  the image) and ``z = slice / (nz - 1)`` over the processed stack.  An axis of
  length 1 has the coordinate 0.
* A basis is a tuple of :class:`Term`: ``factor * x**i * y**j * z**k``.  The
  background is ``sum(coef[t] * term[t])``; its *constant term* is the term with
  ``i = j = k = 0`` (if the basis has one).  Removing the background means
  subtracting it **without** its constant term, so the mean level stays.
* Sampling: every ``s``-th pixel along each axis, starting at 0; with averaging,
  the mean of each block ``[k s, (k + 1) s)`` (clipped at the edge) placed at
  the block's centre.  Only *valid* pixels count: finite and within
  ``[threshold_min, threshold_max]`` (inclusive).
* The robust fit is the iteratively reweighted least squares of
  ``statsmodels.robust.RLM.fit`` with its defaults (scale = MAD of the
  residuals about 0, updated every iteration; stop when the deviance changes by
  at most ``1e-8`` or after 50 fits).  Each weighted least squares is solved
  from normal equations accumulated block by block in a preconditioned basis
  (see :func:`_preconditioner`), so the design matrix never exists in full.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from itertools import product
from typing import Literal

import numpy as np
from threadpoolctl import ThreadpoolController

from pystack3d_dask.errors import ConfigError, StepError
from pystack3d_dask.lazy import lazy_module

linalg = lazy_module("scipy.linalg")

WeightFunc = Literal["HuberT", "Hampel", "None"]

#: Normal quantile at 3/4: the MAD of a standard normal sample (statsmodels' ``GAUSSIAN_3_4``).
MAD_NORMAL = 0.6744897501960817
#: Huber's t tuning constant (statsmodels' default)
HUBER_T = 1.345
#: Hampel's (a, b, c) tuning constants (statsmodels' defaults)
HAMPEL_ABC = (2.0, 4.0, 8.0)

_VARS = "xyz"


# -- basis -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Term:
    """One basis function ``factor * x**i * y**j * z**k``."""

    exponents: tuple[int, int, int]
    factor: float = 1.0

    @property
    def name(self) -> str:
        """Canonical text, e.g. ``"x**2*y"``, ``"2*x"``, ``"1"``."""
        parts = [] if self.factor == 1 else [f"{self.factor:g}"]
        for var, e in zip(_VARS, self.exponents):
            if e:
                parts.append(var if e == 1 else f"{var}**{e}")
        return "*".join(parts) or "1"

    @property
    def is_constant(self) -> bool:
        return self.exponents == (0, 0, 0)


_TOKEN = re.compile(r"\s*(?:(?P<num>\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
                    r"|(?P<var>[xyz])|(?P<pow>\*\*)|(?P<op>[*+]))")


def parse_basis(text: str, *, dim: int = 3, key: str = "poly_basis") -> tuple[Term, ...]:
    """Parse a sum of products of powers of ``x``, ``y``, ``z`` and numbers.

    Grammar (whitespace ignored; never evaluated as code)::

        basis  := term ("+" term)*
        term   := factor ("*" factor)*
        factor := number | var ("**" integer)?
        var    := "x" | "y" | "z"

    Parameters
    ----------
    text : str
        e.g. ``"1 + x + y + x*y + x**2 + z"``.
    dim : {2, 3}
        With 2, ``z`` is not allowed.
    key : str
        Name used in error messages.

    Returns
    -------
    tuple of Term
        In the order written; products are collected (``x*x*2`` is ``2*x**2``).

    Raises
    ------
    ConfigError
        Malformed text (with the position), a repeated term, or ``z`` with ``dim = 2``.

    Examples
    --------
    >>> [t.name for t in parse_basis("1 + x*y + 2*z**2")]
    ['1', 'x*y', '2*z**2']
    """

    def bad(pos: int, what: str) -> ConfigError:
        return ConfigError(f"{key} = {text!r} is invalid at position {pos + 1}: {what} "
                           "(allowed: sums of products of x, y, z, '**' integer powers and numbers).")

    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None:
            at = pos + len(text[pos:]) - len(text[pos:].lstrip())
            raise bad(at, f"unexpected {text[at]!r}" + (" (powers are written '**')" if text[at] == "^" else ""))
        kind = m.lastgroup
        tokens.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    tokens.append(("end", "", len(text)))

    i = 0
    terms: list[Term] = []
    while True:  # one term per pass
        exps, factor, start = [0, 0, 0], 1.0, tokens[i][2]
        while True:  # one factor per pass
            kind, val, at = tokens[i]
            if kind == "num":
                factor *= float(val)
                i += 1
            elif kind == "var":
                power = 1
                if tokens[i + 1][0] == "pow":
                    kind, text_power, at = tokens[i + 2]
                    if kind != "num" or not text_power.isdigit():
                        raise bad(at, "expected a non-negative integer power after '**'")
                    power = int(text_power)
                    i += 2
                exps[_VARS.index(val)] += power
                i += 1
            else:
                raise bad(at, "expected x, y, z or a number" + (" (the text ends)" if kind == "end" else ""))
            if tokens[i][1] != "*":
                break
            i += 1
        term = Term(tuple(exps), factor)
        if any(t.exponents == term.exponents for t in terms):
            raise bad(start, f"the term {term.name!r} appears twice")
        if dim == 2 and term.exponents[2]:
            raise ConfigError(f"{key} = {text!r} uses z but dim = 2 (one fit per slice, in x and y).")
        terms.append(term)
        kind, val, at = tokens[i]
        if kind == "end":
            return tuple(terms)
        if val != "+":
            raise bad(at, f"expected '+' or '*', found {val!r}")
        i += 1


def basis_from_orders(orders: Sequence[int], *, cross_terms: bool) -> tuple[Term, ...]:
    """The basis up to ``orders = (ox, oy[, oz])``.

    ``cross_terms=True``: every ``x**i * y**j * z**k`` with ``i <= ox, j <= oy,
    k <= oz``; ``False``: ``1`` and the pure powers ``x .. x**ox, y .. , z ..``.
    Terms are listed by total degree, then by the exponents of x, y, z
    (highest first).

    Examples
    --------
    >>> [t.name for t in basis_from_orders((1, 1), cross_terms=True)]
    ['1', 'x', 'y', 'x*y']
    >>> [t.name for t in basis_from_orders((2, 0, 1), cross_terms=False)]
    ['1', 'x', 'z', 'x**2']
    """
    full = tuple(orders) + (0,) * (3 - len(orders))
    exps = [e for e in product(*(range(o + 1) for o in full)) if cross_terms or sum(v > 0 for v in e) <= 1]
    exps.sort(key=lambda e: (sum(e), tuple(-v for v in e)))
    return tuple(Term(e) for e in exps)


# -- coordinates and sampling ------------------------------------------------------------------
def coordinates(n: int) -> np.ndarray:
    """Normalised coordinates ``arange(n) / (n - 1)`` of an axis (0 for ``n = 1``)."""
    return np.arange(n) / max(n - 1, 1)


def sample_coordinates(n: int, skip: int, *, averaging: bool) -> np.ndarray:
    """Normalised coordinates of the samples along an axis of ``n`` pixels.

    Samples are at ``0, skip, 2 skip, ...``; with ``averaging`` at the centre
    of each block ``[k skip, min((k + 1) skip, n))``.
    """
    starts = np.arange(0, n, skip)
    centres = (starts + np.minimum(starts + skip, n) - 1) / 2 if averaging else starts
    return centres / max(n - 1, 1)


def valid_mask(block: np.ndarray, threshold_min: float | None, threshold_max: float | None) -> np.ndarray:
    """Pixels that take part in the fit: finite and within the inclusive thresholds."""
    valid = np.isfinite(block) if block.dtype.kind == "f" else np.ones(block.shape, bool)
    if threshold_min is not None:
        valid &= block >= threshold_min
    if threshold_max is not None:
        valid &= block <= threshold_max
    return valid


def bin_sums(a: np.ndarray, size: int, *, axis: int = 0) -> np.ndarray:
    """float64 sums of consecutive groups of ``size`` along ``axis`` (the last group may be shorter)."""
    a = np.moveaxis(a, axis, 0)
    full = len(a) - len(a) % size
    out = a[:full].reshape(full // size, size, *a.shape[1:]).sum(axis=1, dtype=np.float64)
    if full < len(a):
        out = np.concatenate([out, a[full:].sum(axis=0, dtype=np.float64)[None]])
    return np.moveaxis(out, 0, axis)


def sample_sums(
    block: np.ndarray,
    *,
    skip_yx: tuple[int, int],
    averaging: bool,
    threshold_min: float | None = None,
    threshold_max: float | None = None,
) -> np.ndarray:
    """Sums and counts of the valid sampled pixels of each slice of a ``(z, y, x)`` block.

    Returns
    -------
    numpy.ndarray, float64, shape (z, ny, nx, 2)
        ``[..., 0]`` the sum and ``[..., 1]`` the number of valid pixels of each
        sample (one pixel, or one ``sy x sx`` block with ``averaging``).  Sums
        over several slices add up, so blocks along z are formed afterwards.
    """
    sy, sx = skip_yx
    out = np.zeros((block.shape[0], -(-block.shape[1] // sy), -(-block.shape[2] // sx), 2))
    for k, img in enumerate(block):  # slice by slice: temporaries stay one slice large
        if not averaging:
            img = img[::sy, ::sx]
        valid = valid_mask(img, threshold_min, threshold_max)
        values = img if valid.all() else np.where(valid, img, 0)
        if averaging:
            out[k, ..., 0] = bin_sums(bin_sums(values, sy, axis=0), sx, axis=1)
            out[k, ..., 1] = bin_sums(bin_sums(valid, sy, axis=0), sx, axis=1)
        else:
            out[k, ..., 0] = values
            out[k, ..., 1] = valid
    return out


# -- design and robust fit ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Samples:
    """Valid samples of a regular ``(z, y, x)`` grid of sample points.

    Only the values and their flat grid indices are held (12-16 bytes per
    sample); the design matrix is rebuilt block by block when needed
    (:class:`Design`).
    """

    values: np.ndarray  #: (n,) float64
    index: np.ndarray  #: (n,) flat index into the grid
    grid: tuple[np.ndarray, np.ndarray, np.ndarray]  #: normalised coordinates along z, y, x

    @classmethod
    def from_sums(cls, sums: np.ndarray, grid: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Samples:
        """Samples from the ``(z, y, x, 2)`` sums and counts of :func:`sample_sums`."""
        counts = sums[..., 1].reshape(-1)
        index = np.flatnonzero(counts)
        index = index.astype(np.int32) if counts.size < 2**31 else index
        values = sums[..., 0].reshape(-1)[index] / counts[index]
        return cls(values, index, grid)


class Design:
    """Rows of the design matrix of ``terms`` at ``samples``, built on demand.

    Two small tables hold the x part and the (z, y) part of every term on the
    sample grid; a block of rows is then two row gathers and one product.
    """

    def __init__(self, samples: Samples, terms: Sequence[Term]):
        e = np.array([t.exponents for t in terms])
        gz, gy, gx = samples.grid
        self.index = samples.index
        self.nx = len(gx)
        self.x_part = gx[:, None] ** e[:, 0] * np.array([t.factor for t in terms])
        self.zy_part = (gz[:, None, None] ** e[:, 2] * gy[None, :, None] ** e[:, 1]).reshape(-1, len(terms))

    def __call__(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """float64 ``(len(rows), nterms)``: the rows of the samples ``rows``."""
        zy, x = np.divmod(self.index[rows], self.nx)
        out = np.take(self.zy_part, zy, axis=0)
        out *= np.take(self.x_part, x, axis=0)
        return out


def _huber(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(z)
    inside = a <= HUBER_T
    weights = np.where(inside, 1.0, HUBER_T / np.where(inside, 1.0, a))
    rho = np.where(inside, 0.5 * z * z, a * HUBER_T - 0.5 * HUBER_T**2)
    return weights, rho


def _hampel(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b, c = HAMPEL_ABC
    r = np.abs(z)
    safe = np.where(r == 0, 1.0, r)
    weights = np.select([r <= a, r <= b, r <= c], [1.0, a / safe, a * (c - r) / (safe * (c - b))], 0.0)
    rho = np.select(
        [r <= a, r <= b, r <= c],
        [0.5 * z * z, a * r - 0.5 * a * a, -0.5 * a * (c - r) ** 2 / (c - b) + 0.5 * a * (b + c - a)],
        0.5 * a * (b + c - a),
    )
    return weights, rho


#: weight function -> (weights(z), rho(z)) of statsmodels' norm of the same name
NORMS: dict[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]] = {"HuberT": _huber, "Hampel": _hampel}


def _parts(n: int, width: int) -> Iterator[slice]:
    """Row blocks small enough that one block of the design is about 8 MiB."""
    step = max(1024, 2**20 // width)
    return (slice(a, min(a + step, n)) for a in range(0, n, step))


def _preconditioner(design: Design, n: int, terms: Sequence[Term]) -> np.ndarray:
    """A matrix ``P`` such that ``X @ P`` has nearly orthonormal columns.

    Monomials on [0, 1] are far from orthogonal, so the fit solves its normal
    equations in the basis ``X @ P``, which are then well conditioned.  ``P``
    comes from a Cholesky factor of the column-scaled Gram matrix (cheap, and
    accurate enough to precondition); a QR of the design decides when that
    factor is doubtful (collinear columns) and raises if the basis is
    rank-deficient on the samples.
    """
    p = len(terms)
    gram = np.zeros((p, p))
    for part in _parts(n, p):
        x = design(part)
        gram += x.T @ x
    scale = 1 / np.sqrt(np.where(np.diag(gram) > 0, np.diag(gram), 1.0))
    try:
        r = np.linalg.cholesky(gram * np.outer(scale, scale)).T
        pivots = np.abs(np.diag(r))
        if pivots.min() > 1e-6 * pivots.max():
            return scale[:, None] * linalg.solve_triangular(r, np.eye(p))
    except np.linalg.LinAlgError:
        pass
    r = np.zeros((0, p))
    for part in _parts(n, p):
        r = np.linalg.qr(np.vstack([r, design(part) * scale]), mode="r")
    rank = np.linalg.matrix_rank(r)
    if rank < p:
        raise StepError(
            f"the basis terms {[t.name for t in terms]} are linearly dependent on the sampled pixels "
            f"(rank {rank} < {p}): too few sampled rows, columns or slices for the orders; "
            "lower the orders or the skip_factors"
        )
    return scale[:, None] * linalg.solve_triangular(r, np.eye(p))


def _weighted_lstsq(
    design: Design, values: np.ndarray, precond: np.ndarray, weights: np.ndarray | None
) -> np.ndarray:
    """Weighted least squares through the preconditioned normal equations, block by block."""
    p = precond.shape[0]
    gram, rhs = np.zeros((p, p)), np.zeros(p)
    for part in _parts(len(values), p):
        z, y = design(part) @ precond, values[part]
        if weights is not None:
            root = np.sqrt(weights[part])
            z *= root[:, None]
            y = y * root
        gram += z.T @ z
        rhs += z.T @ y
    return precond @ np.linalg.lstsq(gram, rhs, rcond=None)[0]


def _residuals(design: Design, values: np.ndarray, coefs: np.ndarray, out: np.ndarray) -> None:
    for part in _parts(len(values), len(coefs)):
        np.subtract(values[part], design(part) @ coefs, out=out[part])


def robust_fit(
    samples: Samples,
    terms: Sequence[Term],
    *,
    weight_func: WeightFunc = "HuberT",
    maxiter: int = 50,
    tol: float = 1e-8,
) -> np.ndarray:
    """Coefficients of ``terms`` fitted to ``samples`` by a robust M-estimator.

    The same iterations as ``statsmodels.robust.RLM(y, X, M).fit()`` with its
    defaults (``maxiter=50, tol=1e-8, scale_est='mad', conv='dev',
    update_scale=True``): ordinary least squares first, then weighted least
    squares with the norm's weights of ``resid / scale``, ``scale`` being the
    MAD of the residuals about 0; stop when the deviance
    ``sum(rho(resid / s2))`` (``s2`` the weighted residual variance, as in
    statsmodels) changes by at most ``tol``, when the scale is 0, or after
    ``maxiter`` fits.

    Parameters
    ----------
    samples : Samples
        Values and grid positions of the valid samples.
    terms : sequence of Term
        The basis.
    weight_func : {"HuberT", "Hampel", "None"}
        ``HuberT(t=1.345)``, ``Hampel(a=2, b=4, c=8)`` or plain least squares.

    Returns
    -------
    numpy.ndarray
        float64 coefficients, one per term.

    Raises
    ------
    StepError
        Fewer samples than terms + 1, or terms linearly dependent on the samples.

    Notes
    -----
    Extra memory is about 24 bytes per sample (residuals, weights and a work
    array for the median) plus one ~8 MiB block of the design matrix.
    """
    n, p = len(samples.values), len(terms)
    if n <= p:
        raise StepError(f"{n} sampled pixels to fit for {p} basis terms: at least {p + 1} are needed")
    # One BLAS thread: a threaded BLAS splits the dot products and normal equations by its thread
    # count, which changes their summation order and the coefficients' last bits (1e-11 measured
    # between a driver with threaded BLAS and one without): results must not depend on where
    # the fit runs.
    with _blas().limit(limits=1, user_api="blas"):
        return _robust_fit(samples, terms, weight_func, maxiter, tol)


@functools.cache
def _blas() -> ThreadpoolController:
    # built once: a controller scans the loaded libraries (2 ms), its limit() costs 0.02 ms
    return ThreadpoolController()


def _robust_fit(samples: Samples, terms: Sequence[Term], weight_func: WeightFunc, maxiter: int,
                tol: float) -> np.ndarray:
    n, p = len(samples.values), len(terms)
    design, y = Design(samples, terms), samples.values
    precond = _preconditioner(design, n, terms)
    coefs = _weighted_lstsq(design, y, precond, None)
    if weight_func == "None":
        return coefs
    norm = NORMS[weight_func]
    resid, weights, work = np.empty(n), np.ones(n), np.empty(n)

    def update(coefs: np.ndarray) -> tuple[float, float]:
        """Residuals for ``coefs``; return the MAD scale and the deviance."""
        _residuals(design, y, coefs, resid)
        np.multiply(resid, resid, out=work)
        s2 = float(np.dot(work, weights)) / (n - p)
        deviance = sum(float(norm(resid[part] / s2)[1].sum()) for part in _parts(n, 8))
        np.abs(resid, out=work)
        return float(np.median(work, overwrite_input=True)) / MAD_NORMAL, deviance

    scale, deviance = update(coefs)
    for _ in range(2, maxiter + 1):
        if scale == 0.0:  # a perfect fit of the weighted data: nothing left to reweight
            break
        for part in _parts(n, 8):
            weights[part] = norm(resid[part] / scale)[0]
        coefs = _weighted_lstsq(design, y, precond, weights)
        scale, new = update(coefs)
        if abs(new - deviance) <= tol:
            break
        deviance = new
    return coefs


# -- evaluation and removal --------------------------------------------------------------------
def xy_coefficients(coefs: np.ndarray, terms: Sequence[Term], z: float, *, constant: bool = False) -> np.ndarray:
    """The background of one slice as ``A[j, i]``, the coefficient of ``y**j * x**i`` at ``z``.

    The constant term is left out unless ``constant``.
    """
    top = np.max([t.exponents for t in terms], axis=0)
    a = np.zeros((top[1] + 1, top[0] + 1))
    for c, t in zip(coefs, terms):
        if constant or not t.is_constant:
            i, j, k = t.exponents
            a[j, i] += c * t.factor * z**k
    return a


def _powers(n: int, top: int) -> np.ndarray:
    return coordinates(n)[None, :] ** np.arange(top + 1)[:, None]


def moments(
    block: np.ndarray,
    *,
    top: tuple[int, int],
    threshold_min: float | None = None,
    threshold_max: float | None = None,
) -> np.ndarray:
    """``M[k, j, i]``: sum over the valid pixels of slice ``k`` of ``y**j * x**i``.

    Parameters
    ----------
    block : numpy.ndarray, shape (z, y, x)
    top : (jmax, imax)
        Highest powers of y and x.

    Returns
    -------
    numpy.ndarray, float64, shape (z, jmax + 1, imax + 1)
        ``M[k, 0, 0]`` is the number of valid pixels of slice ``k``, and
        ``(A * M[k]).sum()`` the sum over them of the background ``A`` (see
        :func:`xy_coefficients`).
    """
    ypow, xpow = _powers(block.shape[1], top[0]), _powers(block.shape[2], top[1]).T
    out = np.empty((block.shape[0], top[0] + 1, top[1] + 1))
    for k, img in enumerate(block):
        out[k] = ypow @ valid_mask(img, threshold_min, threshold_max).astype(np.float64) @ xpow
    return out


def remove_background(
    block: np.ndarray,
    table: np.ndarray,
    *,
    terms: Sequence[Term],
    threshold_min: float | None = None,
    threshold_max: float | None = None,
) -> np.ndarray:
    """Subtract the background (without its constant term) from each slice of a block.

    Parameters
    ----------
    block : numpy.ndarray, shape (z, y, x)
        Input slices.
    table : numpy.ndarray, shape (z, 2 + nterms)
        Per slice: normalised z, an offset added back (see ``preserve_avg``),
        then the coefficients of ``terms``.
    terms : sequence of Term
        The basis.
    threshold_min, threshold_max : float, optional
        Pixels outside ``[min, max]`` (and non-finite ones) are left unchanged.

    Returns
    -------
    numpy.ndarray
        float32 (float64 for float64 input), shape of ``block``.
    """
    out = np.empty(block.shape, np.result_type(block.dtype, np.float32))
    for k, img in enumerate(block):
        a = xy_coefficients(table[k, 2:], terms, table[k, 0])
        a[0, 0] -= table[k, 1]
        # separable: background = sum_j y**j * (sum_i A[j, i] x**i), one (y, x) pass per power of y
        rows = _powers(img.shape[0], a.shape[0] - 1).T.astype(out.dtype)
        # (a tiny product: broadcasting, not BLAS, whose threads cost more than the work here)
        cols = (a[:, :, None] * _powers(img.shape[1], a.shape[1] - 1)).sum(axis=1).astype(out.dtype)
        np.subtract(img, cols[0], out=out[k])
        for j in range(1, len(cols)):
            out[k] -= np.multiply.outer(rows[:, j], cols[j])
        if threshold_min is not None or threshold_max is not None:
            np.copyto(out[k], img, where=~valid_mask(img, threshold_min, threshold_max))
    return out
