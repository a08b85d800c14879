"""registration_calculation: pairwise matrices of consecutive slices (state only).

Slice ``k - 1`` is the reference of slice ``k``; slice 0 gets the identity
(matrix convention: :mod:`pystack3d_dask.kernels.registration`).  The stack
is cut into pieces of consecutive slices, each given the last slice of the
piece before it, so every pair is computed exactly once whatever the
chunking.

The step computes its state once, on the reference channel, and leaves the
images unchanged; ``registration_transformation`` applies the matrices to
every channel.  Besides the matrices, the state holds a ``confidence`` per
pair (normalised cross-correlation once registered) and ``outliers``, the
pairs whose shift is far from their neighbours' (also named in a warning):
one bad pair shifts every later slice.

Where the pairs run: pystackreg holds the GIL, so without a ``distributed``
client and with ``nproc > 1`` they run in the run's ``nproc`` worker
processes (:mod:`pystack3d_dask.processes`; outside a run, a pool that
lives as long as the step), forked from a fork server that imports numpy
and pystackreg once per Python process.  The main process reads each
chunk of the stack once, registers pairs itself while the workers start,
then sends them pieces of slices that shrink towards the end so they finish
together.  The ``phase_correlation`` method releases the GIL and runs on the
current dask scheduler, in threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from concurrent.futures import wait

import dask
import dask.threaded
import numpy as np
from threadpoolctl import threadpool_limits

from pystack3d_dask.cluster import default_client
from pystack3d_dask.config import check, fail
from pystack3d_dask.kernels.crop import area_slices
from pystack3d_dask.kernels.registration import (
    MIN_BLOCK_SIZE,
    Method,
    Transformation,
    block_centres,
    register_chunk,
    shift_outliers,
)
from pystack3d_dask.lazy import lazy_module
from pystack3d_dask.processes import KernelPool, kernel_pool, pool
from pystack3d_dask.steps.base import State, Step, StepContext, run_step

da = lazy_module("dask.array")

SECTION = "registration_calculation"

#: slices named in the outlier warning (the state holds them all)
MAX_NAMED_OUTLIERS = 20

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
    #: estimator: pystackreg (PyStack3D's, every model) or FFT cross-correlation (TRANSLATION only)
    method: Method = "stackreg"
    #: phase_correlation's sub-pixel grid: 1 / upsample_factor px
    upsample_factor: int = 20

    def __post_init__(self):
        check(min(self.nb_blocks) >= 1, SECTION, "nb_blocks", list(self.nb_blocks), "expected [nx, ny] >= 1")
        check(self.upsample_factor >= 1, SECTION, "upsample_factor", self.upsample_factor, "expected >= 1")
        check(self.method == "stackreg" or self.transformation == "TRANSLATION", SECTION, "method", self.method,
              f'it fits TRANSLATION only, and transformation = "{self.transformation}": use '
              f'method = "stackreg" for that model')


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


def _even_pieces(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


class _Reader:
    """Reads ``stack[max(start - 1, 0) : stop]`` for consecutive pieces, each z chunk of ``stack`` once."""

    def __init__(self, stack: da.Array):
        self.stack = stack
        self.edges = np.cumsum((0,) + stack.chunks[0])
        self.buf, self.buf_start, self.chunk = np.empty((0,) + stack.shape[1:], stack.dtype), 0, 0

    def piece(self, start: int, stop: int) -> np.ndarray:
        lo = max(start - 1, 0)
        self.buf, self.buf_start = self.buf[lo - self.buf_start :], lo  # what no later piece needs is dropped
        while self.buf_start + len(self.buf) < stop:
            c0, c1 = self.edges[self.chunk], self.edges[self.chunk + 1]
            # the threaded scheduler by itself: a scheduler named in dask's config makes a process's first
            # compute import distributed (~0.3 s of CPU before the first pair)
            chunk = self.stack[c0:c1].compute(scheduler=dask.threaded.get)
            self.buf = np.concatenate([self.buf, np.asarray(chunk)])
            self.chunk += 1
        return self.buf[: stop - self.buf_start]


def _in_processes(sub: da.Array, kwargs: dict, pool: KernelPool, first_index: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Register ``sub``'s pieces in the worker processes of ``pool``; the main process reads them.

    Until a worker has started (a fresh fork server imports numpy and
    pystackreg first, ~0.3 s), the main process registers pairs itself, one
    at a time.  Then each piece is ``1 / (2 nproc)`` of the slices left
    (guided scheduling): large pieces first keep the per-piece cost low, the
    small last ones let the workers finish together.
    """
    n, reader, results, futures = sub.shape[0], _Reader(sub), {}, {}
    start = 0
    while start < n:
        in_main = not pool.started()
        stop = start + (1 if in_main else max(1, (n - start) // (2 * pool.nproc)))
        piece = functools.partial(register_chunk, reader.piece(start, stop), has_previous=start > 0,
                                  first_index=first_index + max(start - 1, 0), **kwargs)
        if in_main:
            results[start] = piece()
        else:
            futures[start] = pool.submit(piece)
            wait(list(futures.values())[: -2 * pool.nproc])  # memory: at most 2 pieces per worker read ahead
        start = stop
    results.update((k, f.result()) for k, f in futures.items())
    return [results[k] for k in sorted(results)]


def _in_graph(sub: da.Array, kwargs: dict, workers: int, first_index: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Register ``sub``'s pieces as tasks of the current dask scheduler (threads or ``distributed``).

    With several workers the stack is cut into about ``16 * workers`` pieces
    so that the workers finish together.
    """
    size = max(sub.chunks[0]) if workers == 1 else max(1, min(max(sub.chunks[0]), -(-sub.shape[0] // (16 * workers))))
    tasks = [
        dask.delayed(register_chunk)(sub[max(start - 1, 0) : stop], has_previous=start > 0,
                                     first_index=first_index + max(start - 1, 0), **kwargs)
        for start, stop in _even_pieces(sub.shape[0], size)
    ]
    return list(dask.compute(*tasks))


def _warn_outliers(outliers: np.ndarray, confidence: np.ndarray, first_index: int) -> None:
    """One warning line naming the flagged slices (and their pair's confidence)."""
    flagged = np.flatnonzero(outliers)
    if flagged.size == 0:
        return
    worst = confidence.reshape(confidence.shape[0], -1).min(axis=1)
    named = ", ".join(f"{first_index + k} (NCC {worst[k]:.2f})" for k in flagged[:MAX_NAMED_OUTLIERS])
    more = f" and {flagged.size - MAX_NAMED_OUTLIERS} more" if flagged.size > MAX_NAMED_OUTLIERS else ""
    warnings.warn(
        f"[{SECTION}] {flagged.size} slice(s) shifted far from their neighbours' pairs, check them "
        f"(a wrong pair shifts every later slice): {named}{more}",
        stacklevel=2,
    )


def compute_state(stack: da.Array, params: Params, ctx: StepContext) -> State:
    rows, cols = area_slices(params.area, stack.shape[1:], key=f"[{SECTION}] area")
    sub = stack[:, rows, cols]
    _check_blocks(params.nb_blocks, sub.shape[1:])
    kwargs = dict(transformation=params.transformation, nb_blocks=params.nb_blocks, threshold=params.threshold,
                  origin=(cols.start, rows.start), method=params.method, upsample_factor=params.upsample_factor)
    client = default_client()
    if client is None and not ctx.distributed and ctx.nproc > 1 and params.method == "stackreg":
        # pystackreg holds the GIL: threads would not register pairs side by side.  The run's
        # processes, or (called outside a run) a pool for this step
        with contextlib.ExitStack() as own:
            if pool() is None:
                own.enter_context(kernel_pool(ctx.nproc))
            pieces = _in_processes(sub, kwargs, pool(), ctx.first_index)
    else:
        workers = sum(client.nthreads().values()) if client is not None else ctx.nproc
        # one BLAS thread, as in distributed's workers: the upsampled DFT's matrix products round
        # differently with several (1e-4 px), and tasks already fill the cores
        with threadpool_limits(limits=1, user_api="blas"):
            pieces = _in_graph(sub, kwargs, workers, ctx.first_index)
    mats = np.concatenate([m for m, _ in pieces])
    confidence = np.concatenate([c for _, c in pieces])
    outliers = shift_outliers(mats)
    _warn_outliers(outliers, confidence, ctx.first_index)
    nx, ny = params.nb_blocks
    one = nx * ny == 1
    return {
        "matrices": mats[:, 0, 0] if one else mats,
        "confidence": confidence[:, 0, 0] if one else confidence,
        "outliers": outliers,
        "transformation": params.transformation,
        "nb_blocks": [nx, ny],
        "centres_y": block_centres(rows.stop - rows.start, ny, offset=rows.start),
        "centres_x": block_centres(cols.stop - cols.start, nx, offset=cols.start),
        "shape": [int(stack.shape[1]), int(stack.shape[2])],
    }


def apply(stack: da.Array, params: Params, state: State, ctx: StepContext) -> None:
    return None


def check_shape(params: Params, shape: tuple[int, int, int]) -> None:
    rows, cols = area_slices(params.area, shape[1:], key=f"[{SECTION}] area")
    _check_blocks(params.nb_blocks, (rows.stop - rows.start, cols.stop - cols.start))


STEP = Step(name=SECTION, Params=Params, apply=apply, compute_state=compute_state, shared_state=True,
            check_shape=check_shape, in_processes=lambda params: params.method == "stackreg")


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
    method : {"stackreg", "phase_correlation"}
        pystackreg's TurboReg (default, PyStack3D's), or FFT cross-correlation
        with upsampled-DFT refinement: TRANSLATION only, ~20x faster per pair,
        releases the GIL (threads, or CuPy arrays on a GPU).
    upsample_factor : int
        ``phase_correlation``'s sub-pixel grid, 1 / upsample_factor px (default 20).
    reference_channel : str, optional
        Channel used in a project; ignored here.

    Returns
    -------
    stack : dask.array.Array
        The input, unchanged.
    state : dict
        ``matrices`` ``(z, 3, 3)``, or ``(z, ny, nx, 3, 3)`` with blocks
        (convention: :mod:`pystack3d_dask.kernels.registration`), plus the
        block centres and the image shape used by ``registration_transformation``;
        ``confidence`` ``(z,)`` or ``(z, ny, nx)``, each pair's normalised
        cross-correlation once registered (NaN for slice 0); ``outliers``
        ``(z,)`` bool, the pairs whose shift is far from their neighbours'
        (named in a warning).

    Raises
    ------
    ConfigError
        Unknown transformation or method, ``phase_correlation`` with another
        model than TRANSLATION, or blocks smaller than 16 px.
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
