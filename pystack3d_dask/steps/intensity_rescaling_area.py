"""intensity_rescaling_area: bring every slice's mean over an area to the stack's median.

``mean_k`` is the mean of slice ``k``'s pixels inside ``area`` (PyStack3D's
bottom-left convention, :mod:`pystack3d_dask.kernels.crop`) and within
``[threshold_min, threshold_max]``; ``factor_k = clip(median_j(mean_j) / mean_k,
*factors_range)`` and slice ``k`` is multiplied by ``factor_k``.  A mean of 0
gives the range's maximum (or 1 when the median is 0 too).

One read of the stack (only the area's pixels) for the means, then the write
pass.  PyStack3D crashes in this step (``.median()`` on a list); this one
works.
"""

from __future__ import annotations

import dataclasses

import dask
import numpy as np

from pystack3d_dask.config import check
from pystack3d_dask.errors import StepError
from pystack3d_dask.kernels import histmatch
from pystack3d_dask.kernels.crop import EDGE, area_slices
from pystack3d_dask.lazy import lazy_module
from pystack3d_dask.steps.base import State, Step, StepContext, map_slices, per_slice, run_step

da = lazy_module("dask.array")

SECTION = "intensity_rescaling_area"


@dataclasses.dataclass(frozen=True)
class Params:
    #: [xmin, xmax, ymin, ymax] in pixels, origin at the bottom-left corner (99999: to the edge)
    area: tuple[int, int, int, int] = (0, EDGE, 0, EDGE)
    #: pixels below this grey value are left out of the means (inclusive bound)
    threshold_min: float | None = None
    #: pixels above this grey value are left out of the means (inclusive bound)
    threshold_max: float | None = None
    #: [min, max] allowed for the multiplicative factors
    factors_range: tuple[float, float] = (0.8, 1.2)

    def __post_init__(self):
        lo, hi = self.factors_range
        check(bool(np.isfinite(lo) and np.isfinite(hi) and lo <= hi), SECTION, "factors_range",
              list(self.factors_range), "expected [min, max] with finite min <= max")
        if self.threshold_min is not None and self.threshold_max is not None:
            check(self.threshold_min <= self.threshold_max, SECTION, "threshold_max", self.threshold_max,
                  f"expected a value >= threshold_min = {self.threshold_min}")


def compute_state(stack: da.Array, params: Params, ctx: StepContext) -> State:
    rows, cols = area_slices(params.area, stack.shape[1:], key=f"[{SECTION}] area")
    sums = dask.compute(per_slice(stack[:, rows, cols], histmatch.area_sums, 2, np.float64,
                                  threshold_min=params.threshold_min, threshold_max=params.threshold_max))[0]
    empty = np.flatnonzero(sums[:, 1] == 0)
    if empty.size:
        raise StepError(
            f"[{SECTION}] slice {ctx.first_index + int(empty[0])} has no pixel in area = {list(params.area)} "
            f"within [threshold_min, threshold_max] = [{params.threshold_min}, {params.threshold_max}]."
        )
    means = sums[:, 0] / sums[:, 1]
    median = float(np.median(means))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = median / means
    factors = np.clip(np.nan_to_num(ratio, nan=1.0), *params.factors_range)
    return {"means": means, "median": median, "factors": factors}


def apply(stack: da.Array, params: Params, state: State, ctx: StepContext) -> da.Array:
    return map_slices(stack, histmatch.scale, np.asarray(state["factors"], np.float64))


STEP = Step(name=SECTION, Params=Params, apply=apply, compute_state=compute_state)


def intensity_rescaling_area(stack, **params) -> tuple[da.Array, State]:
    """Scale every slice so its mean over an area matches the median of those means; lazy.

    Parameters
    ----------
    stack : array-like, shape (z, y, x)
        numpy, dask or Zarr array (uint8, uint16, float32, ...).
    area : (xmin, xmax, ymin, ymax), default (0, 99999, 0, 99999)
        Region of the means, bottom-left origin, clipped to the image.
    threshold_min, threshold_max : float, optional
        Only pixels within ``[threshold_min, threshold_max]`` enter the means.
    factors_range : (float, float), default (0.8, 1.2)
        Bounds of the factors, min <= max.
    **params
        Other keywords of :func:`~pystack3d_dask.steps.base.run_step` (``state``, ``cast``, ...).

    Returns
    -------
    result : dask.array.Array
        The scaled stack, cast back to the input dtype.
    state : dict
        ``means`` (nz,), ``median``, ``factors`` (nz,).

    Raises
    ------
    ConfigError
        ``factors_range`` min > max, an area leaving no pixel in the image.
    StepError
        A slice with no pixel in the area within the thresholds (named).

    Examples
    --------
    >>> import numpy as np
    >>> stack = np.stack([np.full((4, 4), v, np.uint8) for v in (100, 90, 100)])
    >>> out, state = intensity_rescaling_area(stack)
    >>> state["factors"].round(3).tolist(), int(out[1].mean().compute())
    ([1.0, 1.111, 1.0], 100)
    """
    return run_step(STEP, stack, **params)
