"""intensity_rescaling: match every slice's histogram to a reference histogram.

Bins, CDFs and the matching itself are defined in
:mod:`pystack3d_dask.kernels.histmatch`.  The reference of slice ``k`` is the
mean histogram of all slices (``filter_size = -1``) or the mean over a window
of ``filter_size`` slices centred on ``k``, clipped at the ends of the stack
(:func:`~pystack3d_dask.kernels.histmatch.running_mean`).

Reads of the stack before the write pass:

* ``range_bins`` given: one (the per-slice histograms);
* one-byte integers (uint8, int8): one - each chunk returns the exact count
  of each of the 256 values per slice, from which the global min/max and any
  histogram follow exactly;
* in a project, one: the engine passes the input's per-slice min/max from
  the previous step's write pass (``ctx.input_stats``);
* otherwise (uint16, float32, ... on a bare array): two - the global min/max, then the
  histograms.  Exact per-value counts of 65536 values per slice would cost
  more memory than a second read (1 GiB of counts for 2000 slices), and a fine
  histogram over the dtype's range cannot be re-binned exactly onto
  ``[min, max]``.

The histograms after the correction come from the write pass itself: the
engine runs the kernel of :func:`write_reduction` on each output chunk it
writes (``histograms_after`` in the state); :func:`histograms_after` does the
same lazily for array-level users.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import dask
import numpy as np

from pystack3d_dask.config import check
from pystack3d_dask.errors import StepError
from pystack3d_dask.kernels import histmatch
from pystack3d_dask.lazy import lazy_module
from pystack3d_dask.steps.base import State, Step, StepContext, map_slices, per_slice, run_step

da = lazy_module("dask.array")

SECTION = "intensity_rescaling"


@dataclasses.dataclass(frozen=True)
class Params:
    #: number of histogram bins
    nbins: int = 256
    #: [min, max] of the bins; by default the global [min, max] of the stack
    range_bins: tuple[float, float] | None = None
    #: -1: one reference, the mean histogram of all slices; n > 0: running mean over n slices
    filter_size: int = 10

    def __post_init__(self):
        check(self.nbins >= 2, SECTION, "nbins", self.nbins, "expected an integer >= 2")
        if self.range_bins is not None:
            lo, hi = self.range_bins
            check(bool(np.isfinite(lo) and np.isfinite(hi) and lo < hi), SECTION, "range_bins",
                  list(self.range_bins), "expected [min, max] with finite min < max")
        check(self.filter_size == -1 or self.filter_size >= 1, SECTION, "filter_size", self.filter_size,
              "expected -1 (mean of all slices) or a window length >= 1")


# -- the step ------------------------------------------------------------------------------------


def _span(lo: float, hi: float) -> tuple[float, float]:
    """``(lo, hi)`` as floats; a constant stack gets ``[v, v + 1]`` (matching it changes nothing)."""
    lo, hi = float(lo), float(hi)
    return lo, (hi if hi > lo else lo + 1.0)


def _global_range(stack: da.Array) -> tuple[float, float]:
    """Global ``[min, max]`` of the stack, ignoring NaN, in one read."""
    if stack.dtype.kind == "f":
        lo, hi = dask.compute(da.nanmin(stack), da.nanmax(stack))
        if not np.isfinite(lo):
            raise StepError(f"[{SECTION}] every pixel of the stack is NaN: no histogram to match.")
        return _span(lo, hi)
    return _span(*dask.compute(stack.min(), stack.max()))


def _histograms(stack: da.Array, params: Params, known: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges and per-slice histograms, reading the stack once or twice (see the module docstring)."""
    if params.range_bins is None and stack.dtype.kind in "ui" and stack.dtype.itemsize == 1:
        counts = dask.compute(per_slice(stack, histmatch.value_counts, 256, np.int64))[0]
        values = np.arange(256) + np.iinfo(stack.dtype).min
        present = values[counts.sum(axis=0) > 0]
        edges = histmatch.bin_edges(*_span(present[0], present[-1]), params.nbins)
        return edges, histmatch.rebin(counts, values, edges)
    if params.range_bins is not None:
        span = params.range_bins
    elif known is not None and np.isfinite(known[:, :2]).any():
        # the engine knows every slice's min/max from the previous write pass: no extra read
        span = _span(np.nanmin(known[:, 0]), np.nanmax(known[:, 1]))
    else:
        span = _global_range(stack)
    edges = histmatch.bin_edges(*span, params.nbins)
    return edges, dask.compute(per_slice(stack, histmatch.histograms, params.nbins, np.int64, edges=edges))[0]


def compute_state(stack: da.Array, params: Params, ctx: StepContext) -> State:
    edges, hists = _histograms(stack, params, ctx.input_stats)
    lo, hi = float(edges[0]), float(edges[-1])
    empty = np.flatnonzero(hists.sum(axis=1) == 0)
    if empty.size:
        raise StepError(
            f"[{SECTION}] slice {ctx.first_index + int(empty[0])} has no pixel within the bins' "
            f"range [{lo}, {hi}] (range_bins = {params.range_bins}): nothing to match."
        )
    if params.filter_size == -1:
        reference = np.broadcast_to(hists.mean(axis=0), hists.shape).copy()
    else:
        reference = histmatch.running_mean(hists, params.filter_size)
    return {"edges": edges, "histograms": hists, "reference": reference, "range_bins": [lo, hi]}


def _match_rows(block: np.ndarray, rows: np.ndarray, *, edges: np.ndarray) -> np.ndarray:
    knots = len(edges)
    return histmatch.match(block, edges, rows[:, :knots], rows[:, knots:])


def apply(stack: da.Array, params: Params, state: State, ctx: StepContext) -> da.Array:
    edges = np.asarray(state["edges"], np.float64)
    table = np.concatenate([histmatch.cdf_knots(state["histograms"]), histmatch.cdf_knots(state["reference"])],
                           axis=1)
    return map_slices(stack, _match_rows, table, edges=edges)


#: state key of the per-slice table computed in the write pass (see :func:`write_reduction`)
WRITE_REDUCTION_KEY = "histograms_after"


def write_reduction(state: State) -> Callable[[np.ndarray], np.ndarray]:
    """The kernel that gives the histograms after the correction, from the chunks as written.

    The engine calls the returned function on each output chunk after the
    dtype cast (in the task that writes it) and stores the ``(cz, nbins)``
    results, concatenated along z, as ``state[WRITE_REDUCTION_KEY]``.  It
    carries only the bin edges, not the whole state.
    """
    return functools.partial(histmatch.histograms, edges=np.asarray(state["edges"], np.float64))


STEP = Step(name=SECTION, Params=Params, apply=apply, compute_state=compute_state,
            write_reduction=write_reduction, write_reduction_key=WRITE_REDUCTION_KEY)


def histograms_after(result, state: State) -> da.Array:
    """Lazy ``(nz, nbins)`` histograms of ``result`` on the same bins as ``state["histograms"]``."""
    x = result if isinstance(result, da.Array) else da.asarray(result)
    return per_slice(x, write_reduction(state), len(state["edges"]) - 1, np.int64)


def intensity_rescaling(stack, **params) -> tuple[da.Array, State]:
    """Match the histogram of every slice to a reference histogram; lazy.

    Parameters
    ----------
    stack : array-like, shape (z, y, x)
        numpy, dask or Zarr array (uint8, uint16, float32, ...).
    nbins : int, default 256
        Number of histogram bins, >= 2.
    range_bins : (float, float), optional
        ``[min, max]`` of the bins (min < max); by default the global min/max of
        the stack.  Values outside it are clamped into the reference's range.
    filter_size : int, default 10
        ``-1``: the reference is the mean histogram of all slices; ``n > 0``:
        slice ``k``'s reference is the mean histogram of the ``n`` slices
        ``k - (n - 1) // 2 .. k + n // 2``, clipped to the stack.
    **params
        Other keywords of :func:`~pystack3d_dask.steps.base.run_step` (``state``, ``cast``, ...).

    Returns
    -------
    result : dask.array.Array
        The matched stack, cast back to the input dtype.
    state : dict
        ``edges`` (nbins + 1,), ``histograms`` (nz, nbins) before, ``reference``
        (nz, nbins), ``range_bins``.  Use :func:`histograms_after` for the
        histograms of ``result``.

    Raises
    ------
    ConfigError
        ``nbins < 2``, ``range_bins`` with min >= max, bad ``filter_size``.
    StepError
        A slice with no pixel within ``range_bins``.

    Examples
    --------
    >>> import numpy as np
    >>> stack = np.stack([np.arange(64, dtype=np.uint8).reshape(8, 8) // f for f in (1, 2, 1)])
    >>> out, state = intensity_rescaling(stack, filter_size=-1, nbins=16)
    >>> state["histograms"].shape, out.dtype
    ((3, 16), dtype('uint8'))
    """
    return run_step(STEP, stack, **params)
