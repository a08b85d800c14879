"""destriping: remove curtaining (vertical stripes) slice by slice.

Two methods, as in PyStack3D:

* VSNR (:mod:`pystack3d_dask.kernels.vsnr`), configured by ``filters``,
  ``maxit`` and ``cvg_threshold`` with pyvsnr's meaning (``norm=False``), on
  the CPU (``backend = "numpy"``), on a GPU (``"cupy"``) or through the
  pyvsnr package itself (``"pyvsnr"``, an optional AGPL dependency); with
  ``solver = "admm"`` (default) pyvsnr's iterations, with ``"fast"`` an
  over-relaxed ADMM that stops closer to the minimiser, in 0.65-0.75x the
  iterations at ``cvg_threshold = 1e-2`` and about half at 1e-3; on
  vertical stripes both transform only the spectrum rows the filter reaches
  (0.3-0.6x the time per iteration);
* the wavelet-FFT filter (:mod:`pystack3d_dask.kernels.wavelet_destripe`),
  used whenever ``wavelet_decomposition`` is given; ``filters`` is then
  ignored, with a warning.

Every slice is corrected on its own (with its own stopping rule), so the
result does not depend on the chunking.  A slice whose VSNR would take more
than ``memory_budget`` (by default half the worker's memory per thread) is
solved in x-tiles (:mod:`pystack3d_dask.kernels.vsnr_tiles`).  Pixels that
are not finite (NaN from a registration with ``mode = "constant"`` on a float
stack) are filled with the slice's mean for the computation and stay NaN in
the output.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import dask
import numpy as np
import psutil
from dask.utils import parse_bytes

from pystack3d_dask.config import check, fail, suggest
from pystack3d_dask.errors import StepError
from pystack3d_dask import processes
from pystack3d_dask.kernels.destripe import destripe, nonfinite_filled
from pystack3d_dask.kernels.vsnr import FILTER_KEYS, vsnr
from pystack3d_dask.kernels.vsnr_tiles import default_overlap, plan_tiles
from pystack3d_dask.lazy import lazy_module
from pystack3d_dask.steps.base import State, Step, StepContext, run_step

da = lazy_module("dask.array")

SECTION = "destriping"
#: defaults of a ``wavelet_decomposition`` table's keys (Münch et al.'s example)
WAVELET_DEFAULTS: dict[str, Any] = {"wavelet": "coif3", "level": 4, "sigma": 4.0}
#: float32 slice-sized arrays one VSNR slice needs on the GPU (work arrays, spectra, FFT workspace)
_GPU_ARRAYS_PER_SLICE = 25
#: pixels of a CPU task: small slices are grouped up to about one 1024² slice (a second or so of
#: VSNR), so that a stack of 10 000 small slices is not 30 000 tasks of a few ms each...
TASK_PIXELS = 2**20
#: ... yet cut in at least this many tasks, for the workers to finish together
MIN_TASKS = 64
#: share of a worker's memory per thread that one VSNR slice may take by default (the rest: the
#: chunks in flight, the interpreter)
BUDGET_SHARE = 0.5


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_filter(i: int, f: Mapping[str, Any]) -> dict[str, Any]:
    """Return filter ``i`` as a clean dict, or raise ConfigError naming ``filters[i].key``."""
    key = f"filters[{i}]"
    name = f.get("name")
    if name not in FILTER_KEYS:
        hint = suggest(name, FILTER_KEYS) if isinstance(name, str) else ""
        fail(SECTION, f"{key}.name", name, f"expected one of {', '.join(map(repr, FILTER_KEYS))}{hint}")
    needed = FILTER_KEYS[name]
    for k in f:
        if k != "name" and k not in needed:
            fail(SECTION, f"{key}.{k}", f[k],
                 f"a {name} filter takes only {', '.join(needed)}{suggest(k, needed)}")
    missing = [k for k in needed if k not in f]
    if missing:
        fail(SECTION, f"{key}.{missing[0]}", None,
             f"missing: a {name} filter needs {', '.join(needed)}")
    eta = f["noise_level"]
    check(_is_number(eta) and eta > 0, SECTION, f"{key}.noise_level", eta, "expected a positive number")
    clean = {"name": name, "noise_level": float(eta)}
    if name == "Gabor":
        sigma = f["sigma"]
        check(isinstance(sigma, (list, tuple)) and len(sigma) == 2
              and all(_is_number(s) and s > 0 for s in sigma),
              SECTION, f"{key}.sigma", sigma, "expected two positive numbers [sx, sy] (pixels)")
        theta = f["theta"]
        check(_is_number(theta), SECTION, f"{key}.theta", theta, "expected an angle in degrees")
        clean.update(sigma=(float(sigma[0]), float(sigma[1])), theta=float(theta))
    return clean


def _parse_budget(value: int | str) -> int:
    """Return ``memory_budget`` in bytes ("2GiB", "800MB" or an integer of bytes), or raise ConfigError."""
    allowed = 'expected a size such as "2GiB" or "800MB", or an integer number of bytes, > 0'
    try:
        budget = parse_bytes(value)
    except (ValueError, TypeError):
        fail(SECTION, "memory_budget", value, allowed)
    check(budget > 0, SECTION, "memory_budget", value, allowed)
    return budget


def _parse_wavelet(table: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``wavelet_decomposition`` with defaults filled in, or raise ConfigError."""
    import pywt

    for k in table:
        if k not in WAVELET_DEFAULTS:
            fail(SECTION, f"wavelet_decomposition.{k}", table[k],
                 f"allowed keys are {', '.join(WAVELET_DEFAULTS)}{suggest(k, WAVELET_DEFAULTS)}")
    out = {**WAVELET_DEFAULTS, **table}
    names = pywt.wavelist(kind="discrete")
    wavelet = out["wavelet"]
    if wavelet not in names:
        hint = suggest(wavelet, names) if isinstance(wavelet, str) else ""
        fail(SECTION, "wavelet_decomposition.wavelet", wavelet,
             f"expected a discrete PyWavelets wavelet, e.g. 'haar', 'db4', 'sym8', 'coif3'{hint} "
             "(all: pywt.wavelist(kind='discrete'))")
    level = out["level"]
    check(isinstance(level, int) and not isinstance(level, bool) and level >= 1,
          SECTION, "wavelet_decomposition.level", level, "expected an integer >= 1")
    sigma = out["sigma"]
    check(_is_number(sigma) and sigma > 0, SECTION, "wavelet_decomposition.sigma", sigma,
          "expected a positive number")
    return {"wavelet": wavelet, "level": level, "sigma": float(sigma)}


@dataclasses.dataclass(frozen=True)
class Params:
    #: VSNR filters: {name = "Gabor", noise_level, sigma = [sx, sy], theta} or {name = "Dirac", noise_level}
    filters: tuple[dict, ...] = ()
    #: maximum VSNR iterations
    maxit: int = 100
    #: stop a slice when max|fx - fx_old| / max|fx| <= this (0: always maxit iterations)
    cvg_threshold: float = 0.0
    #: {wavelet, level, sigma}: use the wavelet-FFT filter instead of VSNR
    wavelet_decomposition: dict | None = None
    #: where VSNR runs: our code on the CPU or a GPU, or the pyvsnr package
    backend: Literal["numpy", "cupy", "pyvsnr"] = "numpy"
    #: "admm": pyvsnr's iterations (its result to ~1e-3); "fast": over-relaxed ADMM, closer to the
    #: minimiser at the same cvg_threshold, in 0.37-0.75x the iterations (kernels.vsnr, Solvers)
    solver: Literal["admm", "fast"] = "admm"
    #: pad slices to fast FFT sizes (kernels.vsnr.fast_shape): ~25 % faster on sizes with large
    #: prime factors (1024 x 904), but no longer pyvsnr's result near the edges (up to a few grey
    #: levels in the outer columns), and with early stopping a slice may stop an iteration apart
    pad: bool = False
    #: memory one VSNR slice may take ("2GiB", or bytes); a slice that needs more is solved in
    #: overlapping x-tiles (kernels.vsnr_tiles). Default: BUDGET_SHARE of the distributed worker's
    #: memory_limit per thread, else of the machine's available memory per scheduler thread
    memory_budget: int | str | None = None

    def __post_init__(self):
        set_ = object.__setattr__
        check(self.maxit >= 1, SECTION, "maxit", self.maxit, "expected an integer >= 1")
        check(math.isfinite(self.cvg_threshold) and self.cvg_threshold >= 0, SECTION,
              "cvg_threshold", self.cvg_threshold, "expected a number >= 0")
        set_(self, "filters", tuple(_parse_filter(i, f) for i, f in enumerate(self.filters)))
        check(not (self.solver == "fast" and self.backend == "pyvsnr"), SECTION, "solver",
              self.solver, "backend = 'pyvsnr' runs pyvsnr's own ADMM: use solver = 'admm' or "
              "backend = 'numpy'")
        if self.memory_budget is not None:
            _parse_budget(self.memory_budget)
            check(self.backend == "numpy", SECTION, "memory_budget", self.memory_budget,
                  f"tiles are for backend = 'numpy' (here {self.backend!r}): remove the key")
        if self.wavelet_decomposition is not None:
            set_(self, "wavelet_decomposition", _parse_wavelet(self.wavelet_decomposition))
            if self.filters:
                warnings.warn(
                    "[destriping] wavelet_decomposition is given: the wavelet-FFT filter is used "
                    "and filters (VSNR) are ignored.", UserWarning, stacklevel=3)
        elif not self.filters:
            fail(SECTION, "filters", [], "give at least one VSNR filter, e.g. "
                 '[{name = "Gabor", noise_level = 20, sigma = [0.5, 200], theta = 0}], '
                 "or a wavelet_decomposition table")


def _require(backend: str) -> None:
    """Fail now, on the client, if the backend's package (or the GPU) is missing."""
    if backend == "cupy":
        try:
            import cupy

            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # ImportError, or CUDA's own error when there is no driver
            raise StepError(
                f"[destriping] backend = 'cupy' needs CuPy and a CUDA GPU ({exc}). Install it with "
                "`pip install pystack3d-dask[gpu]`, or set backend = 'numpy'."
            ) from None
        if count < 1:
            raise StepError("[destriping] backend = 'cupy' found no CUDA GPU; set backend = 'numpy'.")
    elif backend == "pyvsnr":
        try:
            import pyvsnr  # noqa: F401
        except ImportError:
            raise StepError(
                "[destriping] backend = 'pyvsnr' needs the pyvsnr package (AGPL-3): "
                "`pip install pystack3d-dask[pyvsnr]`, or set backend = 'numpy'."
            ) from None


_GPU_LOCK = threading.Lock()


def _vsnr_cupy(block: np.ndarray, **kw) -> np.ndarray:
    import cupy

    # one chunk at a time on the device: a batch fills it, and threads must not stack batches
    with _GPU_LOCK:
        # memory the driver has free plus what CuPy's pool holds from the previous chunk
        free = cupy.cuda.runtime.memGetInfo()[0] + cupy.get_default_memory_pool().free_bytes()
        per_slice = _GPU_ARRAYS_PER_SLICE * 4 * block.shape[1] * block.shape[2]
        batch = max(1, min(block.shape[0], int(0.8 * free) // per_slice))
        return vsnr(block, xp=cupy, batch=batch, **kw)


def _default_budget() -> int:
    """:data:`BUDGET_SHARE` of this worker's memory per thread (see ``Params.memory_budget``)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not in a distributed worker
        worker = None
    if worker is not None and worker.memory_manager.memory_limit:
        return int(BUDGET_SHARE * worker.memory_manager.memory_limit / worker.state.nthreads)
    threads = dask.config.get("num_workers", None) or os.cpu_count() or 1
    return int(BUDGET_SHARE * psutil.virtual_memory().available / threads)


def _tiles(shape: tuple[int, int], budget: int, *, filters, cvg_threshold, solver, pad) -> tuple[int, int]:
    """``(tiles, overlap)`` for a slice of ``shape`` within ``budget`` bytes (ValueError if none fit)."""
    overlap = default_overlap(filters, ny=shape[0], solver=solver)
    return plan_tiles(shape, budget=budget, overlap=overlap, cvg_threshold=cvg_threshold, pad=pad), overlap


def _tiles_within(shape: tuple[int, int], budget: int | None, **kw) -> tuple[int, int]:
    """``(tiles, overlap)`` for a slice of ``shape`` within ``budget`` bytes (default: the worker's)."""
    given = budget is not None
    try:
        return _tiles(shape, budget if given else _default_budget(), filters=kw["filters"],
                      cvg_threshold=kw["cvg_threshold"], solver=kw["solver"], pad=kw["pad"])
    except ValueError as exc:
        raise StepError(f"[destriping] memory_budget ({'given' if given else 'this worker'}): {exc}; "
                        "give more memory per worker thread or set memory_budget.") from None


def _destripe_block(block: np.ndarray, *, method: str, budget: int | None = None, **kw) -> np.ndarray:
    """One task: on the GPU in this thread, else in a worker process of the run (processes.run)."""
    if method == "cupy":
        return nonfinite_filled(_vsnr_cupy, block, **kw)
    if method == "numpy":
        kw["tiles"], kw["overlap"] = _tiles_within(block.shape[1:], budget, **kw)
    return processes.run(destripe, block, method=method, **kw)


def apply(stack: da.Array, params: Params, state: State, ctx: StepContext) -> da.Array:
    if params.wavelet_decomposition is not None:
        kw: dict[str, Any] = {"method": "wavelet", **params.wavelet_decomposition}
    else:
        _require(params.backend)
        kw = {"method": params.backend, "filters": params.filters, "maxit": params.maxit,
              "cvg_threshold": params.cvg_threshold}
        if params.backend != "pyvsnr":
            kw.update(pad=params.pad, solver=params.solver)
        if params.backend == "numpy":
            _check_budget(params, stack.shape)
            kw["budget"] = None if params.memory_budget is None else _parse_budget(params.memory_budget)
    # a big slice costs seconds: one task per slice balances the workers whatever the chunking
    # (3 chunks of 36 slices on 2 workers would leave one idle for a third of the time); small
    # slices go by groups (task_chunks); the GPU keeps whole chunks, its batches
    x = stack if kw["method"] == "cupy" else stack.rechunk(
        (task_chunks(stack.chunks[0], stack.shape[1] * stack.shape[2]), -1, -1))
    out = x.map_blocks(_destripe_block, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32), **kw)
    return out.rechunk(stack.chunks)


def task_chunks(chunks: tuple[int, ...], slice_pixels: int) -> tuple[int, ...]:
    """z chunks of the CPU tasks: each chunk of ``chunks`` cut into near-equal groups of slices.

    A group holds at most :data:`TASK_PIXELS` pixels (one slice when a slice is larger), and
    at most ``1 / MIN_TASKS`` of the stack.  Groups never straddle two chunks, so that the
    cut costs no copy.  Every slice is solved on its own: the groups change no result.
    """
    size = max(1, min(TASK_PIXELS // max(slice_pixels, 1), -(-sum(chunks) // MIN_TASKS)))
    out = []
    for c in chunks:
        k = -(-c // size)
        out += [c // k + (i < c % k) for i in range(k)]
    return tuple(out)


def _check_budget(params: Params, shape: tuple[int, int, int]) -> None:
    """Raise ConfigError when ``memory_budget`` cannot hold even the narrowest tiles of a slice."""
    if params.memory_budget is None or params.wavelet_decomposition is not None:
        return
    try:
        _tiles(tuple(shape[1:]), _parse_budget(params.memory_budget), filters=params.filters,
               cvg_threshold=params.cvg_threshold, solver=params.solver, pad=params.pad)
    except ValueError as exc:
        fail(SECTION, "memory_budget", params.memory_budget, str(exc))


STEP = Step(name="destriping", Params=Params, apply=apply, check_shape=_check_budget,
            in_processes=lambda params: params.backend != "cupy")


def destriping(stack, **params) -> tuple[da.Array, dict]:
    """Remove vertical stripes (curtaining) from every slice; lazy.

    Parameters
    ----------
    stack : array-like, shape (z, y, x)
        numpy, dask or Zarr array.
    filters : list of dict
        VSNR filters, PyStack3D / pyvsnr format:
        ``{"name": "Gabor", "noise_level": 20, "sigma": [0.5, 200], "theta": 0}`` or
        ``{"name": "Dirac", "noise_level": 10}``.
    maxit : int, default 100
        Maximum VSNR iterations per slice.
    cvg_threshold : float, default 0
        Stop a slice early when ``max|fx - fx_old| / max|fx|`` falls to this value.
    wavelet_decomposition : dict, optional
        ``{"wavelet": "coif3", "level": 4, "sigma": 4}``: use the wavelet-FFT
        filter instead (``filters`` is then ignored, with a warning).
    backend : {"numpy", "cupy", "pyvsnr"}, default "numpy"
        VSNR on the CPU, on a CUDA GPU (``pip install pystack3d-dask[gpu]``),
        or through pyvsnr (``pip install pystack3d-dask[pyvsnr]``).
    solver : {"admm", "fast"}, default "admm"
        ``"admm"``: pyvsnr's iterations and result; ``"fast"``: over-relaxed
        ADMM, at the same ``cvg_threshold`` closer to the minimiser, in
        0.65-0.75x the iterations at 1e-2, about half at 1e-3.
    pad : bool, default False
        Pad slices to fast FFT sizes: faster on awkward sizes, but the result
        departs from pyvsnr's near the edges (and early stopping may end an
        iteration apart).
    memory_budget : str or int, optional
        Memory one VSNR slice may take (``"2GiB"``, or bytes; numpy backend):
        a slice that needs more is solved in overlapping x-tiles, blended
        (:mod:`pystack3d_dask.kernels.vsnr_tiles`; 5e-4 relative RMS from
        the untiled result at 2048 x 2048 in 4 tiles with a fixed iteration
        count; with ``cvg_threshold > 0`` the tiles run the count a proxy of
        the slice stops at, close to the slice's but not always equal).
        Default: half the worker's memory per thread.
    zpos, channel, nproc, state, cast :
        See :func:`pystack3d_dask.steps.base.run_step`.

    Returns
    -------
    result : dask.array.Array
        Destriped stack, cast back to the input dtype (unless ``cast=False``).
    state : dict
        Empty: the step has no global state.

    Raises
    ------
    ConfigError
        Unknown filter name, missing or bad filter keys, unknown wavelet, a
        ``memory_budget`` that is not a size or too small for a slice.
    StepError
        ``backend = "cupy"`` without CuPy or a GPU, ``"pyvsnr"`` without pyvsnr.

    Examples
    --------
    >>> import numpy as np
    >>> stack = np.random.default_rng(0).integers(0, 200, (2, 32, 32), dtype=np.uint8)
    >>> out, _ = destriping(stack, filters=[{"name": "Dirac", "noise_level": 1}], maxit=5)
    >>> out.dtype, out.shape
    (dtype('uint8'), (2, 32, 32))
    """
    return run_step(STEP, stack, **params)
