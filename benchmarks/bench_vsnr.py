"""VSNR destriping: our kernel and step vs pyvsnr, on the same slices, in one run.

Run: ``python benchmarks/bench_vsnr.py [--quick] [--repeat 3] [--maxit 30] [--slices 100]``

1. Per slice, one core, same slice and the same number of iterations (no
   early stop): pyvsnr 2.3 (``algo='numpy'``, ``norm=False``, as PyStack3D
   calls it) vs ours unpadded and padded to fast FFT sizes, at 1024 x 904 and
   2048 x 2048.  Best of ``--repeat`` interleaved runs; printed: ms per
   iteration, the speed-up and the difference of the results (relative RMS
   and largest absolute difference, in grey levels).
2. The destriping step on a ``--slices`` x 1024 x 904 uint8 stack with
   PyStack3D's default parameters (Gabor 20 / [0.5, 200] / 0, ``maxit`` 100,
   ``cvg_threshold`` 1e-2), threaded scheduler with 2 workers, vs pyvsnr on
   the same slices in 2 processes (one slice per call).
3. Only when CuPy and a GPU are present: seconds per slice at 2048^2 and
   4224^2 (batched), and the projected time for 2000 slices of 2000^2.

``--quick``: fewer iterations, slices and repeats (a smoke run, ~1 min).
This machine is shared: compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import dask
import numpy as np

from pystack3d_dask.kernels.vsnr import fast_shape, vsnr
from pystack3d_dask.steps.base import as_stack
from pystack3d_dask.steps.destriping import destriping
from pystack3d_dask.synthetic import SyntheticCase

FILTERS = [{"name": "Gabor", "noise_level": 20, "sigma": (0.5, 200), "theta": 0}]


def curtained_slices(n: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``n`` uint8 slices of the synthetic blobs, each with its own sparse curtains."""
    case = SyntheticCase((max(n, 8),) + shape, defects=("background",), seed=seed)
    rng = np.random.default_rng(seed)
    out = np.empty((n,) + shape, np.uint8)
    for j in range(n):
        img = case.defect_slice(j).astype(np.float32)
        img += 25 * np.clip(rng.normal(0, 1, shape[1]) * (rng.random(shape[1]) > 0.7), -1.5, 1.5)
        out[j] = np.clip(np.rint(img), 0, 255)
    return out


def pyvsnr_slice(img: np.ndarray, maxit: int, cvg_threshold: float = 0.0) -> np.ndarray:
    from pyvsnr import vsnr2d

    try:
        return vsnr2d(np.asarray(img, np.float32), [dict(f) for f in FILTERS], maxit=maxit,
                      algo="numpy", norm=False, cvg_threshold=cvg_threshold)
    finally:
        np.fft = sys.modules["numpy.fft"]  # pyvsnr swaps numpy.fft for pyfftw process-wide


def _pyvsnr_default(img: np.ndarray) -> np.ndarray:
    return pyvsnr_slice(img, 100, 1e-2)


def timed(func):
    t0 = time.perf_counter()
    out = func()
    return time.perf_counter() - t0, out


def diff(a: np.ndarray, b: np.ndarray) -> str:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rel = np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2))
    return f"rel. RMS {rel:.1e}, max |diff| {np.abs(a - b).max():.2f}"


def per_slice(shape: tuple[int, int], maxit: int, repeat: int) -> None:
    img = curtained_slices(1, shape)[0].astype(np.float32)
    runs = {
        "pyvsnr": lambda: pyvsnr_slice(img, maxit),
        "ours, unpadded": lambda: vsnr(img, filters=FILTERS, maxit=maxit, pad=False),
    }
    if fast_shape(shape) != shape:
        runs[f"ours, padded to {fast_shape(shape)}"] = lambda: vsnr(img, filters=FILTERS, maxit=maxit, pad=True)
    for run in runs.values():  # warm-up: pyfftw plans, our filter cache
        run()
    best, results = {k: np.inf for k in runs}, {}
    for _ in range(repeat):  # interleaved, so a noisy neighbour hurts every method alike
        for name, run in runs.items():
            t, results[name] = timed(run)
            best[name] = min(best[name], t)
    ref = best["pyvsnr"]
    print(f"\n{shape[0]} x {shape[1]}, {maxit} iterations, one core, best of {repeat}:")
    for name in runs:
        line = f"  {name:32s} {1e3 * best[name] / maxit:7.1f} ms/iteration"
        if name != "pyvsnr":
            line += f"   x{ref / best[name]:.2f} faster   vs pyvsnr: {diff(results[name], results['pyvsnr'])}"
        print(line)


def step_vs_processes(nslices: int) -> None:
    stack = curtained_slices(nslices, (1024, 904))
    params = {"filters": FILTERS, "maxit": 100, "cvg_threshold": 1e-2}
    x = as_stack(stack)  # the engine's default chunking (~32 MiB chunks)
    destriping(x[:2], **params)[0].compute()  # warm-up
    with dask.config.set(scheduler="threads", num_workers=2):
        t_ours, ours = timed(lambda: destriping(x, cast=False, **params)[0].compute())
        t_pad, padded = timed(lambda: destriping(x, cast=False, pad=True, **params)[0].compute())
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_pyvsnr_default, stack[:2]))  # start the processes, plan the FFTs
        t_ref, ref = timed(lambda: np.stack(list(pool.map(_pyvsnr_default, stack))))
    print(f"\ndestriping step, {nslices} x 1024 x 904 uint8, maxit 100, cvg_threshold 1e-2, 2 workers:")
    print(f"  pyvsnr, 2 processes          {t_ref:7.1f} s")
    print(f"  ours (default: unpadded)     {t_ours:7.1f} s   x{t_ref / t_ours:.2f} faster   {diff(ours, ref)}")
    print(f"  ours, pad = true             {t_pad:7.1f} s   x{t_ref / t_pad:.2f} faster   {diff(padded, ref)}")


def gpu(xp, sync, sizes=((2048, 2048), (4224, 4224), (2000, 2000)), batch=16, maxit=100,
        mem_bytes=20e9) -> None:
    """Seconds per slice on the device, batched; projected 2000 slices of 2000^2."""
    print(f"\nGPU ({xp.__name__}), batches of up to {batch} slices, maxit {maxit}:")
    per = {}
    for shape in sizes:
        n = max(1, min(batch, int(mem_bytes // (96 * shape[0] * shape[1]))))  # ~24 float32 arrays a slice
        stack = xp.asarray(curtained_slices(n, shape).astype(np.float32))
        vsnr(stack[:1], filters=FILTERS, maxit=2, xp=xp)  # FFT plans, filters
        for cvg in (0.0, 1e-2):
            sync()
            t0 = time.perf_counter()
            _, its = vsnr(stack, filters=FILTERS, maxit=maxit, cvg_threshold=cvg, batch=n, xp=xp,
                          return_iterations=True)
            sync()
            per[shape, cvg] = (time.perf_counter() - t0) / n
            print(f"  {shape[0]} x {shape[1]}, cvg_threshold {cvg:g}: {per[shape, cvg]:.3f} s per slice "
                  f"(batch {n}, mean {its.mean():.0f} iterations)")
    for cvg in (0.0, 1e-2):
        print(f"  projected 2000 x 2000^2, cvg_threshold {cvg:g}: {2000 * per[(2000, 2000), cvg]:.0f} s "
              "(PyStack3D paper: 120 s on an A100; goal <= 30 s on an H100)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--maxit", type=int, default=30, help="iterations of the per-slice comparison")
    ap.add_argument("--slices", type=int, default=100, help="slices of the step comparison")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat, args.maxit, args.slices = 1, 10, 10
    os.environ.setdefault("PYFFTW_NUM_THREADS", "1")
    for shape in ((1024, 904), (2048, 2048)):
        per_slice(shape, args.maxit, args.repeat)
    step_vs_processes(args.slices)
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no GPU")
    except Exception as exc:
        print(f"\nGPU section skipped: {exc}")
        return
    gpu(cupy, cupy.cuda.Device().synchronize)


if __name__ == "__main__":
    main()
