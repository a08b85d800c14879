"""Registration: the cost of one pair, the step's overhead around it, and the accuracy of each method.

Run: ``python benchmarks/bench_registration.py [--shape 33 1024 1024] [--nproc 2] [--repeat 2]
[--accuracy-shape 300 300 300] [--no-transformation] [--no-accuracy]``

A drifting texture (uint8, ~1.5 px and 0.1 degree per slice) is written to a
temporary Zarr v3 store with whole-slice chunks (as the engine's), then, in
the same run (this machine is shared: read ratios, not seconds):

* ``pair``: one pair with pystackreg (TRANSLATION) and with
  ``phase_correlation``, in this process, one BLAS thread; the ratio is the
  speed-up per pair (target >= 10x at 1024^2).  The confidence (NCC after
  alignment) that the step adds to every pair is timed apart.
* ``step``: ``registration_calculation`` with ``nproc`` processes (pool
  start, reading, shipping included) against ``pairs x pair / nproc``:
  the wall ratio (target <= 1.15) and the CPU ratio (CPU seconds of the main
  process and the workers over the pairs' CPU seconds: the overhead the load
  of other programs cannot hide), interleaved ``--repeat`` times, best kept.
  ``phase_correlation`` runs in ``nproc`` threads.  ``bare pool`` is the
  floor measured under the same load: a warm pool of ``nproc`` processes
  registering the pairs of an in-memory stack, split evenly, with nothing
  else (no start-up, reading, confidence or scheduling); the step's ratio to
  it is the overhead when the machine is shared.
* ``accuracy``: the synthetic case (shifts only, ``--accuracy-shape``), both
  methods: per-pair error (px) against the known shifts, and the largest
  residual of the cumulative x/y shift with ``subpixel = false`` (the
  demo's setting) and ``true``.
* ``registration_transformation``: warp of every slice, with and without
  cropping, relative to a plain read.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr
from scipy import ndimage as ndi
from threadpoolctl import threadpool_limits

from pystack3d_dask.kernels.registration import alignment_ncc, register_pair
from pystack3d_dask.kernels.warp import warp_affine
from pystack3d_dask.steps.registration_calculation import registration_calculation
from pystack3d_dask.steps.registration_transformation import registration_transformation
from pystack3d_dask.store import COMPRESSION

sys.path.insert(0, str(Path(__file__).parent))
from common import drain  # noqa: E402

#: slices per Zarr chunk
CHUNK = 8
METHODS = ("stackreg", "phase_correlation")


def drifting_stack(path: str, shape: tuple[int, int, int]) -> da.Array:
    """Write a texture drifting by ~1.5 px and turning by 0.1 degree per slice; return it lazily."""
    n, h, w = shape
    margin = max(8, int(0.1 * n * 1.5) + 16)
    rng = np.random.default_rng(0)
    big = ndi.gaussian_filter(rng.standard_normal((h + 2 * margin, w + 2 * margin)).astype(np.float32), 3)
    big = 128 + 100 * big / np.abs(big).max()
    z = zarr.create_array(path, shape=shape, chunks=(CHUNK, h, w), dtype="uint8", compressors=COMPRESSION["none"])
    motion = np.eye(3)
    a = np.deg2rad(0.1)
    step = np.array([[np.cos(a), -np.sin(a), 1.5], [np.sin(a), np.cos(a), -0.7], [0, 0, 1]])
    for start in range(0, n, CHUNK):
        block = []
        for _ in range(start, min(start + CHUNK, n)):
            shift = np.eye(3)
            shift[:2, 2] = margin
            block.append(np.rint(warp_affine(big, shift @ motion, mode="edge", rect=(0, h, 0, w))))
            motion = motion @ step
        z[start:start + len(block)] = np.clip(block, 0, 255).astype(np.uint8)
    return da.from_zarr(z, chunks=(CHUNK, h, w))


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended (the pool's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(func, repeat: int) -> tuple[float, float]:
    """Best wall seconds and best CPU seconds of ``repeat`` calls of ``func()``."""
    walls, cpus = [], []
    for _ in range(repeat):
        c0, t0 = cpu_seconds(), time.perf_counter()
        func()
        walls.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    return min(walls), min(cpus)


def pair_costs(ref: np.ndarray, mov: np.ndarray, repeat: int) -> dict[str, tuple[float, float]]:
    """Per method, (wall, CPU) seconds of one pair; and of the confidence of one pair."""
    out = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for method in METHODS:
            register_pair(ref, mov, transformation="TRANSLATION", method=method)  # warm-up (imports, caches)
            out[method] = measure(lambda: register_pair(ref, mov, transformation="TRANSLATION", method=method),
                                  repeat + 2)
        m = register_pair(ref, mov, transformation="TRANSLATION", method="phase_correlation")
        out["confidence"] = measure(lambda: alignment_ncc(ref, mov, m), repeat + 2)
    return out


def _pairs(stack: np.ndarray, ks: list[int]) -> list[np.ndarray]:
    return [register_pair(stack[k - 1], stack[k], transformation="TRANSLATION") for k in ks]


def bare_pool(stack: np.ndarray, nproc: int, repeat: int) -> float:
    """Best wall seconds of a warm pool registering ``stack``'s pairs, split evenly, data in memory."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(nproc, mp_context=ctx, initializer=threadpool_limits, initargs=(1, "blas")) as pool:
        for f in [pool.submit(_pairs, stack[:2], [1]) for _ in range(nproc)]:  # start and warm every worker
            f.result()
        return measure(lambda: [f.result() for f in [pool.submit(_pairs, stack, list(range(1 + i, len(stack), nproc)))
                                                   for i in range(nproc)]], repeat)[0]


def accuracy(shape: tuple[int, int, int], nproc: int) -> dict[str, dict[str, float]]:
    """Per method: per-pair errors and cumulative residuals (px) on the synthetic case, shifts only."""
    from pystack3d_dask.synthetic import make_case

    case = make_case(shape, defects=("shifts",))
    truth = np.diff(case.shifts, prepend=0.0)
    out = {}
    for method in METHODS:
        _, calc = registration_calculation(case.stack, nproc=nproc, method=method)
        m = calc["matrices"]
        err = np.hypot(m[1:, 0, 2] - truth[1:], m[1:, 1, 2])
        res = {"pair max": float(err.max()), "pair rms": float(np.sqrt(np.mean(err**2)))}
        for subpixel in (False, True):
            c = registration_transformation(case.stack, calc, subpixel=subpixel)[1]["cumulative"]
            res[f"cumulative, subpixel={subpixel}"] = float(max(np.abs(c[:, 0, 2] - case.shifts).max(),
                                                                np.abs(c[:, 1, 2]).max()))
        res["outliers flagged"] = int(calc["outliers"].sum())
        out[method] = res
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(33, 1024, 1024), metavar=("Z", "Y", "X"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    parser.add_argument("--accuracy-shape", type=int, nargs=3, default=(300, 300, 300), metavar=("Z", "Y", "X"))
    parser.add_argument("--no-transformation", action="store_true", help="skip registration_transformation")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the accuracy on the synthetic case")
    args = parser.parse_args(argv)
    shape, nproc = tuple(args.shape), args.nproc
    mib = np.prod(shape) / 2**20
    pairs = shape[0] - 1
    with tempfile.TemporaryDirectory() as tmp:
        x = drifting_stack(f"{tmp}/stack.zarr", shape)
        print(f"stack {shape} uint8 = {mib:.0f} MiB, chunks of {CHUNK} slices, TRANSLATION, nproc = {nproc}, "
              f"{dask.system.CPU_COUNT} CPUs")
        ref, mov = (np.asarray(x[k]) for k in (shape[0] // 2, shape[0] // 2 + 1))
        cost = pair_costs(ref, mov, args.repeat)
        (sr_wall, sr_cpu), (pc_wall, _) = cost["stackreg"], cost["phase_correlation"]
        print(f"pair  stackreg {1e3 * sr_wall:8.1f} ms   phase_correlation {1e3 * pc_wall:7.1f} ms   "
              f"x{sr_wall / pc_wall:5.1f} per pair   (+ confidence {1e3 * cost['confidence'][0]:.1f} ms: "
              f"x{sr_wall / (pc_wall + cost['confidence'][0]):.1f} with it)")
        with dask.config.set(scheduler="threads", num_workers=nproc), threadpool_limits(limits=1, user_api="blas"):
            t_read = measure(lambda: drain(x), 1)[0]
            t_bare = bare_pool(np.asarray(x), nproc, args.repeat)
            for method in METHODS:
                wall, cpu = measure(lambda: registration_calculation(x, nproc=nproc, method=method), args.repeat)
                pair_wall, pair_cpu = cost[method][0] + cost["confidence"][0], cost[method][1] + cost["confidence"][1]
                ideal = pairs * pair_wall / nproc
                print(f"step  {method:17s} {wall:7.2f} s   pairs x pair / nproc {ideal:7.2f} s   "
                      f"wall ratio {wall / ideal:5.2f}   CPU ratio {cpu / (pairs * pair_cpu):5.2f}   "
                      f"{pairs / wall:6.1f} pairs/s" + (f"   ratio to bare pool {wall / t_bare:5.2f}"
                                                          if method == "stackreg" else ""))
            print(f"bare pool (stackreg, warm, in memory)   {t_bare:7.2f} s")
            if not args.no_transformation:
                _, state = registration_calculation(x, nproc=nproc, method="phase_correlation")
                print(f"{'read':44s} {t_read:7.2f} s {mib / t_read:8.1f} MiB/s")
                for crop in (False, True):
                    t = measure(lambda: drain(registration_transformation(x, state, cropping=crop)[0]), 1)[0]
                    name = f"registration_transformation, cropping={crop}"
                    print(f"{name:44s} {t:7.2f} s {mib / t:8.1f} MiB/s  ratio to read {t_read / t:6.3f}")
    if args.no_accuracy:
        return
    acc = accuracy(tuple(args.accuracy_shape), nproc)
    print(f"accuracy on the synthetic case {tuple(args.accuracy_shape)}, shifts only (px):")
    for method, res in acc.items():
        print(f"  {method:17s} " + "   ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in res.items()))


if __name__ == "__main__":
    main()
