"""Registration: pairs/s on one and two processes, and throughput relative to a plain read.

Run: ``python benchmarks/bench_registration.py [--shape 33 1024 1024] [--repeat 2] [--threads] [--paper-case] [--transformation TRANSLATION]``

A drifting, slightly rotating texture (uint8) is written to a temporary Zarr v3
store with the project's compressor and whole-slice chunks; then, in the same
run:

* ``read``: every chunk of the store read once (threaded scheduler);
* ``registration_calculation``: pairs/s with ``nproc = 1`` (one process)
  and ``nproc = 2`` (a pool of two processes), ``--repeat`` interleaved runs:
  the best single-process run, the first two-process run ("cold": the pool's
  start included) and the best later one ("warm": the pool is kept for the
  session); the speed-up of two processes over one is the figure to watch
  (target >= 1.7x on 2 cores).  ``--threads`` adds two
  threads in one process, which pystackreg's GIL keeps near 1x;
* ``registration_transformation``: cumulation, crop and warp of every slice,
  cast to uint8 (threaded scheduler), with and without cropping.

Each line gives MiB/s of input and the ratio to the plain read.  With
``--paper-case``, the max residual shift after correction on the synthetic
300 x 300 x 300 case (shifts only) is printed too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr
from scipy import ndimage as ndi

from pystack3d_dask.kernels.warp import warp_affine
from pystack3d_dask.steps.registration_calculation import registration_calculation
from pystack3d_dask.steps.registration_transformation import registration_transformation
from pystack3d_dask.store import COMPRESSION

sys.path.insert(0, str(Path(__file__).parent))
from common import drain  # noqa: E402

#: slices per Zarr chunk
CHUNK = 8


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


def timed(func) -> float:
    t0 = time.perf_counter()
    func()
    return time.perf_counter() - t0


def paper_case_residual() -> float:
    """Max residual x/y shift (px) after correction on the synthetic 300^3 case, shifts only."""
    from pystack3d_dask.synthetic import make_case

    case = make_case((300, 300, 300), defects=("shifts",))
    _, calc = registration_calculation(case.stack, nproc=2)
    _, state = registration_transformation(case.stack, calc, subpixel=False)
    c = state["cumulative"]
    return float(max(np.abs(c[:, 0, 2] - case.shifts).max(), np.abs(c[:, 1, 2]).max()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(33, 1024, 1024), metavar=("Z", "Y", "X"))
    parser.add_argument("--transformation", default="TRANSLATION",
                        choices=("TRANSLATION", "RIGID_BODY", "SCALED_ROTATION", "AFFINE"))
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    parser.add_argument("--threads", action="store_true", help="also time two threads in one process")
    parser.add_argument("--paper-case", action="store_true", help="also report the ground-truth residual")
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    mib = np.prod(shape) / 2**20
    pairs = shape[0] - 1
    with tempfile.TemporaryDirectory() as tmp:
        x = drifting_stack(f"{tmp}/stack.zarr", shape)
        print(f"stack {shape} uint8 = {mib:.0f} MiB, chunks of {CHUNK} slices, {args.transformation}, "
              f"{dask.system.CPU_COUNT} CPUs")
        with dask.config.set(scheduler="threads"):
            t_read = timed(lambda: drain(x))
        print(f"{'read':44s} {t_read:7.2f} s {mib / t_read:8.1f} MiB/s")

        def calc(nproc: int, scheduler: str, workers: int) -> tuple[float, dict]:
            out = {}
            with dask.config.set(scheduler=scheduler, num_workers=workers):
                t = timed(lambda: out.update(
                    registration_calculation(x, nproc=nproc, transformation=args.transformation)[1]))
            return t, out

        # interleaved, best of --repeat: other load on the machine hits both alike
        t1, t2 = np.inf, []
        for _ in range(args.repeat):
            t, state = calc(1, "sync", 1)
            t1 = min(t1, t)
            t, state2 = calc(2, "threads", 2)
            t2.append(t)
        assert np.array_equal(state["matrices"], state2["matrices"])
        lines = [("registration_calculation, 1 process", t1),
                 ("registration_calculation, 2 processes, cold", t2[0])]
        if len(t2) > 1:
            lines.append(("registration_calculation, 2 processes, warm", min(t2[1:])))
        if args.threads:
            lines.append(("registration_calculation, 2 threads (GIL)", calc(1, "threads", 2)[0]))
        for name, t in lines:
            print(f"{name:44s} {t:7.2f} s {pairs / t:6.2f} pairs/s  x{t1 / t:4.2f}  "
                  f"ratio to read {t_read / t:6.3f}")
        with dask.config.set(scheduler="threads"):
            for crop in (False, True):
                t = timed(lambda: drain(registration_transformation(x, state, cropping=crop)[0]))
                name = f"registration_transformation, cropping={crop}"
                print(f"{name:44s} {t:7.2f} s {mib / t:8.1f} MiB/s  ratio to read {t_read / t:6.3f}")
    if args.paper_case:
        print(f"paper case 300^3, shifts: max residual shift after correction {paper_case_residual():.3f} px")


if __name__ == "__main__":
    main()
