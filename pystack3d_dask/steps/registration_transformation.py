"""registration_transformation: warp every slice with its cumulative matrix.

The pairwise matrices come from ``registration_calculation``'s state
(``ctx.previous``).  ``compute_state`` only does 3x3 arithmetic (cumulation
``C[k] = M[k] @ C[k-1]``, corrections, and the crop rectangle found from the
matrices); ``apply`` then warps each chunk with the matrices of its own slices
(convention: :mod:`pystack3d_dask.kernels.registration`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from pystack3d_dask.config import check
from pystack3d_dask.errors import StepError
from pystack3d_dask.kernels.registration import (
    block_centres,
    cumulate,
    remove_drift,
    remove_running_mean,
    valid_rectangle,
    zero_subpixel,
)
from pystack3d_dask.kernels.warp import Mode, warp_stack
from pystack3d_dask.lazy import lazy_module
from pystack3d_dask.steps.base import State, Step, StepContext, run_step

da = lazy_module("dask.array")

SECTION = "registration_transformation"
CALCULATION = "registration_calculation"


@dataclasses.dataclass(frozen=True)
class Params:
    #: false: pairwise translations below one pixel are zeroed before cumulating
    subpixel: bool = True
    #: [dx, dy] per slice removed from the cumulative translations
    constant_drift: tuple[float, float] | None = None
    #: remove the running mean over this many slices of the cumulative matrices
    box_size_averaging: int | None = None
    #: filling of pixels coming from outside the image (numpy.pad names; constant = NaN)
    mode: Mode = "constant"
    #: crop to the largest rectangle never reached by outside pixels
    cropping: bool = False

    def __post_init__(self):
        if self.box_size_averaging is not None:
            check(self.box_size_averaging >= 2, SECTION, "box_size_averaging", self.box_size_averaging,
                  "expected an integer >= 2 (slices in the running mean)")


def _calculation_state(ctx: StepContext) -> State:
    if CALCULATION not in ctx.previous:
        raise StepError(
            f"{SECTION} needs the matrices of {CALCULATION}: run {CALCULATION} first "
            f"(or pass previous={{'{CALCULATION}': state}})."
        )
    return ctx.previous[CALCULATION]


def compute_state(stack: da.Array, params: Params, ctx: StepContext) -> State:
    calc = _calculation_state(ctx)
    pairwise = np.asarray(calc["matrices"], np.float64)
    nz, shape = stack.shape[0], tuple(int(s) for s in stack.shape[1:])
    if pairwise.shape[0] != nz:
        raise StepError(
            f"{SECTION}: {CALCULATION} gave {pairwise.shape[0]} matrices for a stack of {nz} slices; "
            f"run {CALCULATION} again on this stack."
        )
    if list(calc.get("shape", shape)) != list(shape):
        raise StepError(
            f"{SECTION}: the matrices were computed on {calc['shape'][1]} x {calc['shape'][0]} px slices, "
            f"this stack has {shape[1]} x {shape[0]} px: crop after registration, not between its two steps."
        )
    if not params.subpixel:
        pairwise = zero_subpixel(pairwise)
    cumulative = cumulate(pairwise)
    if params.constant_drift is not None:
        cumulative = remove_drift(cumulative, params.constant_drift)
    if params.box_size_averaging is not None:
        cumulative = remove_running_mean(cumulative, params.box_size_averaging)
    state: State = {"cumulative": cumulative}
    if cumulative.ndim == 5:
        ny, nx = cumulative.shape[1:3]
        state["centres_y"] = np.asarray(calc.get("centres_y", block_centres(shape[0], ny)), np.float64)
        state["centres_x"] = np.asarray(calc.get("centres_x", block_centres(shape[1], nx)), np.float64)
    if params.cropping:
        # The piecewise warp samples a convex mix of the block matrices' samples,
        # so a rectangle safe for every block matrix is safe for the mix.
        state["crop"] = list(valid_rectangle(cumulative, shape))
    return state


def apply(stack: da.Array, params: Params, state: State, ctx: StepContext) -> da.Array:
    cumulative = np.asarray(state["cumulative"], np.float64)
    rect = tuple(state["crop"]) if state.get("crop") is not None else None
    r0, r1, c0, c1 = rect or (0, stack.shape[1], 0, stack.shape[2])
    # Each task receives only the matrices of its own slices.
    mats = da.from_array(cumulative, chunks=(stack.chunks[0],) + cumulative.shape[1:])
    mat_index = "zabcd"[: cumulative.ndim]
    kernel = functools.partial(
        warp_stack, mode=params.mode, rect=rect,
        centres_y=state.get("centres_y"), centres_x=state.get("centres_x"),
    )
    return da.blockwise(
        kernel, "zyx",
        stack, "zyx",
        mats, mat_index,
        concatenate=True,
        adjust_chunks={"y": r1 - r0, "x": c1 - c0},
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    )


STEP = Step(name=SECTION, Params=Params, apply=apply, compute_state=compute_state,
            requires=("registration_calculation",))


def registration_transformation(
    stack, matrices: Mapping[str, Any] | np.ndarray, **params
) -> tuple[da.Array, State]:
    """Align every slice on slice 0 with the cumulative registration matrices; lazy.

    Parameters
    ----------
    stack : array-like, shape (z, y, x)
        numpy, dask or Zarr array.
    matrices : dict or ndarray
        The state of :func:`registration_calculation`, or its pairwise
        matrices ``(z, 3, 3)`` / ``(z, ny, nx, 3, 3)`` (blocks over the whole image).
    subpixel : bool
        False: pairwise translations below one pixel are zeroed (default True).
    constant_drift : (dx, dy), optional
        Drift per slice removed from the cumulative translations.
    box_size_averaging : int, optional
        Remove the running mean over this many slices of the cumulative matrices.
    mode : {"constant", "edge", "symmetric", "reflect", "wrap"}
        Filling of pixels coming from outside (``"constant"``: NaN, 0 for integers).
    cropping : bool
        Crop to the largest rectangle never reached by outside pixels (default False).

    Returns
    -------
    stack : dask.array.Array
        Registered stack, in the input dtype.
    state : dict
        ``cumulative`` matrices and, with cropping, ``crop = [row_start, row_stop, col_start, col_stop]``.

    Examples
    --------
    >>> import numpy as np
    >>> pairwise = np.tile(np.eye(3), (3, 1, 1))
    >>> pairwise[1:, 0, 2] = 2.0  # each slice moved 2 px left of the one before
    >>> out, state = registration_transformation(np.ones((3, 8, 8), np.float32), pairwise, cropping=True)
    >>> out.shape, float(state["cumulative"][2, 0, 2])
    ((3, 8, 4), 4.0)
    """
    calc = dict(matrices) if isinstance(matrices, Mapping) else {"matrices": np.asarray(matrices)}
    return run_step(STEP, stack, previous={CALCULATION: calc}, **params)
