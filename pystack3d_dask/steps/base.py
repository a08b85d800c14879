"""The step interface every correction step implements.

A step is three things (see ``cropping.py`` for the smallest example):

``Params``
    A frozen dataclass whose fields are the step's TOML keys (with defaults);
    ``__post_init__`` checks ranges with :func:`pystack3d_dask.config.check`.
    Built only through :func:`pystack3d_dask.config.build_params`.
``compute_state(stack, params, ctx) -> State`` (optional)
    The small global state computed first from reductions over the stack
    (coefficients, histograms, matrices).  It returns concrete values: a dict
    of numpy arrays and JSON-able scalars/lists.  The engine persists it
    before the heavy pass, so a resumed run does not recompute it.  The key
    ``"zpos"``, when present, holds the z positions of the *output* slices.
``apply(stack, params, state, ctx) -> dask array | None``
    The lazy per-chunk graph (``map_blocks`` / ``map_overlap``) over whole
    slices.  It may return float data; the engine (or :func:`run_step`) clips
    and casts to the stack's dtype.  ``None`` means "images unchanged" (a
    step that only computes state, like ``registration_calculation``).

Stacks are ``(z, y, x)`` dask arrays chunked by whole slices: every chunk has
the full ``(y, x)`` extent.  Nothing here knows about files or clusters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from pystack3d_dask.config import build_params
from pystack3d_dask.kernels.dtype import clip_cast
from pystack3d_dask.lazy import lazy_module

da = lazy_module("dask.array")

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a step may know about its surroundings besides the stack."""

    #: channel being processed (sub-folder name, ``"."`` for the root)
    channel: str = "."
    #: z positions of the input slices (length ``nz``), or None when unknown
    zpos: np.ndarray | None = None
    #: number of parallel workers the user asked for (``nproc``)
    nproc: int = 1
    #: True when a ``distributed`` client runs the graphs (tasks already in processes)
    distributed: bool = False
    #: index of the input's first slice in the original numbering (for messages)
    first_index: int = 0
    #: states of the earlier steps this one requires (``Step.requires``), by step name (e.g.
    #: the matrices of ``registration_calculation`` for ``registration_transformation``)
    previous: Mapping[str, State] = dataclasses.field(default_factory=dict)
    #: per-slice ``(min, max, mean)`` of the input, ``(nz, 3)``, when already known (the engine
    #: has them from the previous step's write pass): lets a step skip a min/max read
    input_stats: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Step:
    """A correction step: its parameters, its global state and its lazy graph."""

    name: str
    Params: type
    apply: Callable[[da.Array, Any, State, StepContext], da.Array | None]
    compute_state: Callable[[da.Array, Any, StepContext], State] | None = None
    #: computed once, on the reference (first) channel, and applied to every channel
    shared_state: bool = False
    #: ``write_reduction(state) -> kernel``: a per-slice table computed from each output chunk
    #: as written (after the dtype cast), in the writing task, e.g. the histograms after a
    #: correction; ``kernel(block) -> (cz, m)``.  Saved as ``state[write_reduction_key]``.
    write_reduction: Callable[[State], Callable[[np.ndarray], np.ndarray]] | None = None
    write_reduction_key: str = "after"
    #: steps whose state this one needs; they must come earlier in ``process_steps``
    requires: tuple[str, ...] = ()
    #: ``output_shape(params, shape) -> shape``: the result's ``(z, y, x)`` shape when the
    #: parameters alone fix it; by default the input's, an upper bound for steps whose state
    #: crops (registration).  Lets every parameter be checked against the shape before work.
    output_shape: Callable[[Any, tuple[int, int, int]], tuple[int, int, int]] | None = None
    #: ``check_shape(params, shape)``: raise ``ConfigError`` when the parameters cannot work on an
    #: input of this ``(z, y, x)`` shape (an upper bound, see ``output_shape``); called before any work
    check_shape: Callable[[Any, tuple[int, int, int]], None] | None = None
    #: ``in_processes(params)``: whether the step hands kernels to the run's worker processes
    #: (:mod:`pystack3d_dask.processes`) with these parameters; the engine then starts them with
    #: the run, while the first steps compute
    in_processes: Callable[[Any], bool] | None = None

    def shape_out(self, params: Any, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The result's shape (an upper bound where the state decides) for an input ``shape``."""
        return shape if self.output_shape is None else self.output_shape(params, shape)

    def uses_processes(self, params: Any) -> bool:
        """Whether the step hands kernels to the run's worker processes with these parameters."""
        return self.in_processes is not None and self.in_processes(params)

    def params(self, table: dict | None = None, **kwargs) -> Any:
        """Build and validate this step's parameters from a TOML table or keywords."""
        return build_params(self.Params, {**(table or {}), **kwargs}, section=self.name)

    def state(self, stack: da.Array, params: Any, ctx: StepContext) -> State:
        """Compute the global state (an empty dict for stateless steps)."""
        return {} if self.compute_state is None else self.compute_state(stack, params, ctx)


def as_stack(arr: Any, *, chunk_slices: int | None = None) -> da.Array:
    """Return ``arr`` (numpy, dask, Zarr, ...) as a 3-D dask array chunked by whole slices.

    Parameters
    ----------
    arr : array-like
        A ``(z, y, x)`` array (a single ``(y, x)`` image is taken as one slice).
    chunk_slices : int, optional
        Slices per chunk; by default the existing z chunking of a dask array,
        or about 32 MiB per chunk otherwise.

    Raises
    ------
    ValueError
        An array that is not 2-D or 3-D, is empty, or holds no integer or float pixels (bool).
    """
    if not isinstance(arr, da.Array) and not hasattr(arr, "dtype"):
        arr = np.asarray(arr)
    if getattr(arr, "ndim", 0) not in (2, 3):
        raise ValueError(f"expected a (z, y, x) stack or a (y, x) image, got an array of shape {arr.shape}.")
    if 0 in arr.shape:
        raise ValueError(f"expected a stack with pixels, got an empty array of shape {arr.shape}.")
    if np.dtype(arr.dtype).kind not in "uif":
        raise ValueError(f"expected integer or float pixels, got dtype {np.dtype(arr.dtype)} "
                         "(convert a mask, e.g. arr.astype('uint8')).")
    if isinstance(arr, da.Array):
        x = arr
    else:
        x = da.from_array(arr, chunks=(1,) + tuple(arr.shape[1:]) if arr.ndim == 3 else -1)
    if x.ndim == 2:
        x = x[None]
    if chunk_slices is None:
        if isinstance(arr, da.Array):
            chunk_slices = max(x.chunks[0])
        else:
            chunk_slices = default_chunk_slices(x.shape, x.dtype)
    return x.rechunk((chunk_slices, -1, -1))


def per_slice(stack: da.Array, kernel: Callable, width: int, dtype, **kwargs) -> da.Array:
    """Lazy ``(nz, width)`` table from ``kernel(block, **kwargs) -> (cz, width)`` on each chunk."""
    return stack.map_blocks(kernel, **kwargs, drop_axis=2, chunks=(stack.chunks[0], (width,)),
                            dtype=dtype, meta=np.empty((0, 0), dtype))


def map_slices(stack: da.Array, kernel: Callable, table: np.ndarray, *, dtype=np.float32, **kwargs) -> da.Array:
    """Lazy ``kernel(block, rows, **kwargs)`` on each chunk, ``rows`` = its slices' rows of ``table``.

    Each task receives only its own rows of the small per-slice ``table``
    (``(nz, ...)``, flattened to ``(nz, k)``), never the whole table.
    """
    rows = da.from_array(np.asarray(table).reshape(stack.shape[0], -1), chunks=(stack.chunks[0], -1))
    return da.blockwise(kernel, "zyx", stack, "zyx", rows, "zk", concatenate=True, dtype=dtype,
                        meta=np.empty((0, 0, 0), dtype), **kwargs)


def default_chunk_slices(shape: tuple[int, ...], dtype: Any, *, target_mib: float = 32.0) -> int:
    """Slices per chunk so a chunk of ``dtype`` is about ``target_mib`` MiB (at least 1)."""
    slice_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
    return int(max(1, min(shape[0], (target_mib * 2**20) // max(slice_bytes, 1))))


def run_step(
    step: Step,
    stack: Any,
    *,
    zpos: Any = None,
    channel: str = ".",
    nproc: int = 1,
    state: State | None = None,
    previous: Mapping[str, State] | None = None,
    cast: bool = True,
    **params: Any,
) -> tuple[da.Array, State]:
    """Run ``step`` on any array, outside a project: the public array-level API.

    The global state is computed now (unless given); the result is lazy.
    ``previous`` gives the states of earlier steps a step depends on (e.g.
    ``{"registration_calculation": state}`` for ``registration_transformation``).

    Returns
    -------
    result : dask.array.Array
        Lazy corrected stack, cast back to the input dtype when ``cast``.
    state : dict
        The step's global state (coefficients, histograms, matrices, ...).
    """
    x = as_stack(stack)
    p = step.params(params)
    ctx = StepContext(
        channel=channel,
        zpos=None if zpos is None else np.asarray(zpos, float),
        nproc=nproc,
        previous=dict(previous or {}),
    )
    if state is None:
        state = step.state(x, p, ctx)
    out = step.apply(x, p, state, ctx)
    if out is None:
        out = x
    if cast and out.dtype != x.dtype:
        out = out.map_blocks(clip_cast, x.dtype, dtype=x.dtype)
    return out, state
