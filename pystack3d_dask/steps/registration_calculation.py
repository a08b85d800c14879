"""registration_calculation: pairwise matrices of consecutive slices (state only).

Slice ``k - 1`` is the reference of slice ``k``; slice 0 gets the identity
(matrix convention: :mod:`pystack3d_dask.kernels.registration`).  Each chunk
is given the last slice of the chunk before it (overlap of depth ``(1, 0)``
along z), so every pair is computed exactly once whatever the chunking.

The step computes its state once, on the reference channel, and leaves the
images unchanged; ``registration_transformation`` applies the matrices to
every channel.  pystackreg holds the GIL, so without a ``distributed`` client
the pairs run in a pool of ``nproc`` processes, started for the step.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import dask
import dask.array as da
import numpy as np

from pystack3d_dask.config import check, fail
from pystack3d_dask.kernels.crop import area_slices
from pystack3d_dask.kernels.registration import (
    MIN_BLOCK_SIZE,
    Transformation,
    block_centres,
    register_chunk,
)
from pystack3d_dask.steps.base import State, Step, StepContext, run_step

SECTION = "registration_calculation"


@dataclasses.dataclass(frozen=True)
class Params:
    #: model fitted to each pair (StackReg / TurboReg)
    transformation: Transformation = "TRANSLATION"
    #: [xmin, xmax, ymin, ymax] (bottom-left origin) on which the matrices are computed
    area: tuple[int, int, int, int] = (0, 99999, 0, 99999)
    #: register the binarised images ``pixel <= threshold``
    threshold: float | None = None
    #: [nx, ny] blocks along x and y, one matrix per block
    nb_blocks: tuple[int, int] = (1, 1)
    #: channel on which the matrices are computed (default: the first one)
    reference_channel: str | None = None

    def __post_init__(self):
        check(min(self.nb_blocks) >= 1, SECTION, "nb_blocks", list(self.nb_blocks), "expected [nx, ny] >= 1")


def _check_blocks(nb_blocks: tuple[int, int], area_shape: tuple[int, int]) -> None:
    """ConfigError when ``nb_blocks`` cuts the registration area into blocks smaller than MIN_BLOCK_SIZE."""
    nx, ny = nb_blocks
    bw, bh = area_shape[1] // nx, area_shape[0] // ny
    if min(bw, bh) < MIN_BLOCK_SIZE:
        fail(
            SECTION,
            "nb_blocks",
            list(nb_blocks),
            f"it cuts the {area_shape[1]} x {area_shape[0]} px registration area into blocks of "
            f"{bw} x {bh} px; blocks need at least {MIN_BLOCK_SIZE} px per side",
        )


def _chunk_matrices(block: np.ndarray, params: Params, origin: tuple[int, int], first_index: int,
                    block_info=None) -> np.ndarray:
    # The first chunk has no overlap: its block is exactly the output chunk.
    out = block_info[None]
    has_previous = block.shape[0] == out["chunk-shape"][0] + 1
    start = out["array-location"][0][0] - int(has_previous)
    return register_chunk(
        block,
        has_previous=has_previous,
        first_index=first_index + start,
        transformation=params.transformation,
        nb_blocks=params.nb_blocks,
        threshold=params.threshold,
        origin=origin,
    )


def _compute_in_processes(matrices: da.Array, nproc: int) -> np.ndarray:
    """Compute ``matrices`` in a pool of ``nproc`` processes, one task at a time per worker."""
    # A pool for this call only, shut down on every way out (an error, Ctrl-C, SIGTERM) once
    # its running tasks end: no worker process outlives the step.  Starting it costs ~0.5 s.
    pool = ProcessPoolExecutor(nproc, mp_context=multiprocessing.get_context("spawn"))
    try:
        # chunksize=1: dask's default batches of tasks leave one worker idle at the end
        (mats,) = dask.compute(matrices, scheduler="processes", pool=pool, chunksize=1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return mats


def _client():
    """The default ``distributed`` client, or None (then the local schedulers run the graph)."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def pairwise_matrices(stack: da.Array, params: Params, ctx: StepContext, *, workers: int = 1) -> da.Array:
    """Lazy ``(nz, ny, nx, 3, 3)`` pairwise matrices of ``stack``.

    With several workers, the registration area is cut into about
    ``16 * workers`` chunks so that the workers finish together (a chunk only
    adds one slice of overlap; the result does not depend on the chunking).
    """
    rows, cols = area_slices(params.area, stack.shape[1:], key=f"[{SECTION}] area")
    sub = stack[:, rows, cols]
    _check_blocks(params.nb_blocks, sub.shape[1:])
    if workers > 1:
        sub = sub.rechunk((max(1, min(max(sub.chunks[0]), -(-sub.shape[0] // (16 * workers)))), -1, -1))
    nx, ny = params.nb_blocks
    overlapped = da.overlap.overlap(sub, depth={0: (1, 0), 1: 0, 2: 0}, boundary="none")
    kernel = functools.partial(
        _chunk_matrices, params=params, origin=(cols.start, rows.start), first_index=ctx.first_index
    )
    return overlapped.map_blocks(
        kernel,
        chunks=(sub.chunks[0], (ny,), (nx,), (3,), (3,)),
        new_axis=[3, 4],
        dtype=np.float64,
        meta=np.empty((0,) * 5, np.float64),
    )


def compute_state(stack: da.Array, params: Params, ctx: StepContext) -> State:
    client = _client()
    workers = sum(client.nthreads().values()) if client is not None else ctx.nproc
    matrices = pairwise_matrices(stack, params, ctx, workers=workers)
    if client is None and not ctx.distributed and ctx.nproc > 1:
        # pystackreg holds the GIL: threads would not register pairs side by side
        mats = _compute_in_processes(matrices, ctx.nproc)
    else:
        (mats,) = dask.compute(matrices)
    rows, cols = area_slices(params.area, stack.shape[1:], key=f"[{SECTION}] area")
    nx, ny = params.nb_blocks
    return {
        "matrices": mats[:, 0, 0] if nx * ny == 1 else mats,
        "transformation": params.transformation,
        "nb_blocks": [nx, ny],
        "centres_y": block_centres(rows.stop - rows.start, ny, offset=rows.start),
        "centres_x": block_centres(cols.stop - cols.start, nx, offset=cols.start),
        "shape": [int(stack.shape[1]), int(stack.shape[2])],
    }


def apply(stack: da.Array, params: Params, state: State, ctx: StepContext) -> None:
    return None


STEP = Step(name=SECTION, Params=Params, apply=apply, compute_state=compute_state, shared_state=True)


def registration_calculation(stack, *, nproc: int = 1, **params) -> tuple[da.Array, State]:
    """Compute the pairwise registration matrices of consecutive slices.

    Parameters
    ----------
    stack : array-like, shape (z, y, x)
        numpy, dask or Zarr array.
    nproc : int
        Processes used for the pairs when no ``distributed`` client runs.
    transformation : {"TRANSLATION", "RIGID_BODY", "SCALED_ROTATION", "AFFINE"}
        Model fitted to each pair (default ``"TRANSLATION"``).
    area : (xmin, xmax, ymin, ymax)
        Region used for the registration, bottom-left origin (default: whole image).
    threshold : float, optional
        Register the binarised images ``pixel <= threshold``.
    nb_blocks : (nx, ny)
        One matrix per block of an ``nx`` x ``ny`` grid (default ``(1, 1)``).
    reference_channel : str, optional
        Channel used in a project; ignored here.

    Returns
    -------
    stack : dask.array.Array
        The input, unchanged.
    state : dict
        ``matrices`` ``(z, 3, 3)``, or ``(z, ny, nx, 3, 3)`` with blocks
        (convention: :mod:`pystack3d_dask.kernels.registration`), plus the
        block centres and the image shape used by ``registration_transformation``.

    Raises
    ------
    ConfigError
        Unknown transformation, or blocks smaller than 16 px.
    StepError
        A threshold that leaves no pixel in a slice (the slice is named).

    Examples
    --------
    >>> import numpy as np
    >>> _, state = registration_calculation(np.random.default_rng(0).random((3, 64, 64)))
    >>> state["matrices"].shape
    (3, 3, 3)
    """
    return run_step(STEP, stack, nproc=nproc, **params)
