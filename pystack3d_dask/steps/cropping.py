"""cropping / cropping_final: keep a rectangular area of every slice.

``area = [xmin, xmax, ymin, ymax]`` with PyStack3D's bottom-left origin (see
:mod:`pystack3d_dask.kernels.crop`).  Pure slicing of the lazy stack: chunks
stay whole slices and nothing is computed until the result is written.
"""

from __future__ import annotations

import dataclasses
import functools

from pystack3d_dask.kernels.crop import area_slices
from pystack3d_dask.lazy import lazy_module
from pystack3d_dask.steps.base import State, Step, StepContext, run_step

da = lazy_module("dask.array")


@dataclasses.dataclass(frozen=True)
class Params:
    #: [xmin, xmax, ymin, ymax] in pixels, origin at the bottom-left corner
    area: tuple[int, int, int, int]


def apply(stack: da.Array, params: Params, state: State, ctx: StepContext, *,
          section: str = "cropping") -> da.Array | None:
    rows, cols = area_slices(params.area, stack.shape[1:], key=f"[{section}] area")
    if (rows.stop - rows.start, cols.stop - cols.start) == stack.shape[1:]:
        return None  # the whole image: no copy (PyStack3D's default [0, 99999, 0, 99999])
    return stack[:, rows, cols]


def output_shape(params: Params, shape: tuple[int, int, int], *,
                 section: str = "cropping") -> tuple[int, int, int]:
    rows, cols = area_slices(params.area, shape[1:], key=f"[{section}] area")
    return (shape[0], rows.stop - rows.start, cols.stop - cols.start)


def _step(name: str) -> Step:
    # messages name the table the area came from: [cropping] or [cropping_final]
    return Step(name=name, Params=Params, apply=functools.partial(apply, section=name),
                output_shape=functools.partial(output_shape, section=name))


STEP = _step("cropping")
#: the same step run last, on the corrected stack
FINAL_STEP = _step("cropping_final")


def crop(stack, area: tuple[int, int, int, int]) -> da.Array:
    """Crop every slice of ``stack`` to ``area`` (bottom-left origin); lazy.

    Parameters
    ----------
    stack : array-like, shape (z, y, x)
        numpy, dask or Zarr array.
    area : (xmin, xmax, ymin, ymax)
        In pixels; clipped to the image (99999 means "to the edge").

    Returns
    -------
    dask.array.Array
        The cropped stack, chunked by whole slices.

    Examples
    --------
    >>> import numpy as np
    >>> crop(np.zeros((3, 10, 20)), (5, 15, 0, 4)).shape
    (3, 4, 10)
    """
    return run_step(STEP, stack, area=area)[0]
