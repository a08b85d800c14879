"""resampling: uniform spacing along z by linear interpolation between slices.

The input z positions come from the context (parsed from the file names at
ingest through ``policy``, see :mod:`pystack3d_dask.io.zpos`, or given to
:func:`resampling`).  The output positions are either a uniform grid of step
``dz`` from the lowest to the highest input position, **both included** when
the highest falls on the grid (PyStack3D's ``arange`` drops it), or the
explicit ``zpos_out``; ``zpos_out`` wins when both are given (with a warning),
as an explicit list is the more specific request.

Out of core and neighbour-aware: each output slice needs only the two input
slices around it (:func:`pystack3d_dask.kernels.resample.brackets`).  Each
output chunk reads the contiguous run of input slices between its first and
last brackets, so it depends only on the input chunks holding them, possibly
the neighbouring chunk, never on the whole stack.  Output chunks are
regular, with the input's slices per chunk.  The state holds the output
positions under ``"zpos"`` (the engine's new z positions) and the input ones
under ``"zpos_in"``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from pystack3d_dask.config import check
from pystack3d_dask.errors import StepError
from pystack3d_dask.io.zpos import DEFAULT_POLICY, check_zpos, compile_policy
from pystack3d_dask.kernels.resample import RTOL, brackets, interpolate, output_dtype, uniform_grid
from pystack3d_dask.lazy import lazy_module
from pystack3d_dask.steps.base import State, Step, StepContext, run_step

da = lazy_module("dask.array")

SECTION = "resampling"


@dataclasses.dataclass(frozen=True)
class Params:
    #: file-name pattern giving each slice's z position; read at ingest, not by the step
    policy: str = DEFAULT_POLICY
    #: output spacing along z, in the unit of the z positions
    dz: float | None = None
    #: explicit output positions, strictly increasing (wins over dz)
    zpos_out: tuple[float, ...] | None = None

    def __post_init__(self):
        compile_policy(self.policy, key=f"[{SECTION}] policy")
        check(self.dz is None or (math.isfinite(self.dz) and self.dz > 0),
              SECTION, "dz", self.dz, "expected a spacing > 0")
        if self.zpos_out is not None:
            z = np.asarray(self.zpos_out, dtype=np.float64)
            check(z.size > 0 and bool(np.all(np.isfinite(z))) and bool(np.all(np.diff(z) > 0)),
                  SECTION, "zpos_out", list(self.zpos_out),
                  "expected a non-empty list of finite, strictly increasing positions")
        check(self.dz is not None or self.zpos_out is not None, SECTION, "dz", self.dz,
              "give dz (the output spacing) or zpos_out (the output positions)")
        if self.dz is not None and self.zpos_out is not None:
            warnings.warn(f"[{SECTION}] both dz and zpos_out are given: zpos_out is used, dz = {self.dz} "
                          "is ignored.", stacklevel=2)


def _input_positions(stack: da.Array, ctx: StepContext, params: Params) -> np.ndarray:
    if ctx.zpos is None:
        raise StepError(
            f"[{SECTION}] the z positions of the slices are missing: no file names gave them "
            f"through policy = {params.policy!r} (a multi-page TIFF has none); name the files "
            "after the policy, or pass zpos= to resampling()."
        )
    zin = check_zpos(ctx.zpos, first_index=ctx.first_index)
    if len(zin) != stack.shape[0]:
        raise StepError(f"[{SECTION}] {len(zin)} z positions for a stack of {stack.shape[0]} slices.")
    return zin


def _inside(zpos_out: tuple[float, ...], zmin: float, zmax: float) -> np.ndarray:
    """The requested positions within ``[zmin, zmax]``; the others are dropped with a warning."""
    z = np.asarray(zpos_out, dtype=np.float64)
    tol = RTOL * (zmax - zmin)
    keep = (z >= zmin - tol) & (z <= zmax + tol)
    if not keep.any():
        raise StepError(
            f"[{SECTION}] zpos_out = {list(zpos_out)!r} has no position inside the data's "
            f"z range [{zmin:g}, {zmax:g}]."
        )
    if not keep.all():
        outside = z[~keep]
        warnings.warn(
            f"[{SECTION}] {outside.size} zpos_out position(s) outside the data's z range "
            f"[{zmin:g}, {zmax:g}] dropped: {outside[:5].tolist()}{' ...' if outside.size > 5 else ''}.",
            stacklevel=3,
        )
    return np.clip(z[keep], zmin, zmax)


def compute_state(stack: da.Array, params: Params, ctx: StepContext) -> State:
    zin = _input_positions(stack, ctx, params)
    zmin, zmax = float(zin[0]), float(zin[-1])
    if params.zpos_out is not None:
        zout = _inside(params.zpos_out, zmin, zmax)
    else:
        zout = uniform_grid(zmin, zmax, params.dz)
    return {"zpos": zout, "zpos_in": zin}


def apply(stack: da.Array, params: Params, state: State, ctx: StepContext) -> da.Array:
    zin = np.asarray(state["zpos_in"], dtype=np.float64)
    if len(zin) != stack.shape[0]:
        raise StepError(f"[{SECTION}] the saved state has {len(zin)} input positions for "
                        f"a stack of {stack.shape[0]} slices.")
    lower, upper, weight = brackets(zin, np.asarray(state["zpos"], dtype=np.float64))
    cz = max(stack.chunks[0])
    dtype = output_dtype(stack.dtype)
    starts = np.cumsum((0,) + stack.chunks[0])
    name = f"{SECTION}-{tokenize(stack, lower, upper, weight)}"
    # One task per output chunk, given the whole input chunks that hold its brackets.  The
    # layer is written out directly: slicing the input once per output chunk cost ~10 ms of
    # graph work each (minutes for 10 000 chunks); this costs microseconds.
    layer, sizes = {}, []
    for i, a in enumerate(range(0, len(weight), cz)):
        b = min(a + cz, len(weight))
        first = int(np.searchsorted(starts, lower[a], side="right")) - 1
        last = int(np.searchsorted(starts, upper[b - 1], side="right")) - 1
        blocks = [(stack.name, k) + (0,) * (stack.ndim - 1) for k in range(first, last + 1)]
        offset = starts[first]
        layer[(name, i) + (0,) * (stack.ndim - 1)] = (
            _interpolate_blocks, blocks, lower[a:b] - offset, upper[a:b] - offset, weight[a:b])
        sizes.append(b - a)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[stack])
    return da.Array(graph, name, chunks=(tuple(sizes),) + stack.chunks[1:], dtype=dtype,
                    meta=np.empty((0, 0, 0), dtype))


def _interpolate_blocks(blocks: list[np.ndarray], lower: np.ndarray, upper: np.ndarray,
                        weight: np.ndarray) -> np.ndarray:
    return interpolate(blocks[0] if len(blocks) == 1 else np.concatenate(blocks), lower, upper, weight)


STEP = Step(name=SECTION, Params=Params, apply=apply, compute_state=compute_state)


def resampling(
    stack,
    *,
    zpos,
    dz: float | None = None,
    zpos_out: tuple[float, ...] | None = None,
    policy: str = DEFAULT_POLICY,
    cast: bool = True,
) -> tuple[da.Array, State]:
    """Resample ``stack`` to uniform (or given) z positions by linear interpolation; lazy.

    Parameters
    ----------
    stack : array-like, shape (z, y, x)
        numpy, dask or Zarr array.
    zpos : array-like
        z position of each input slice, strictly increasing (e.g. from
        :func:`pystack3d_dask.io.zpos.parse_zpos`).
    dz : float, optional
        Output spacing (> 0): positions from ``min(zpos)`` to ``max(zpos)``,
        both included when ``max(zpos)`` falls on the grid.
    zpos_out : sequence of float, optional
        Explicit output positions, strictly increasing; those outside
        ``[min(zpos), max(zpos)]`` are dropped with a warning.  Wins over ``dz``.
    policy : str
        File-name pattern (kept for TOML compatibility; ``zpos`` is used here).
    cast : bool
        Cast the result back to the input dtype (rounded, clipped).

    Returns
    -------
    result : dask.array.Array
        Shape ``(len(state["zpos"]), y, x)``, chunked like the input along z.
    state : dict
        ``"zpos"``: output positions, ``"zpos_in"``: input positions (float64).

    Raises
    ------
    ConfigError
        ``dz <= 0``, neither ``dz`` nor ``zpos_out``, a malformed ``zpos_out``.
    InputError
        ``zpos`` not finite or not strictly increasing (the slices are named).
    StepError
        ``zpos`` missing or of the wrong length, no ``zpos_out`` inside the data.

    Examples
    --------
    >>> import numpy as np
    >>> out, state = resampling(np.zeros((3, 4, 4)), zpos=[0.0, 0.1, 0.3], dz=0.1)
    >>> out.shape, state["zpos"].round(3).tolist()
    ((4, 4, 4), [0.0, 0.1, 0.2, 0.3])
    """
    return run_step(STEP, stack, zpos=zpos, cast=cast, dz=dz, zpos_out=zpos_out, policy=policy)
