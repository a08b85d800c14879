"""bkg_removal: throughput relative to a plain read, and the 3-D fit's peak memory at 1x, 4x and 16x slices.

Run: ``python benchmarks/bench_bkg_removal.py [--shape 64 1024 1024] [--repeat 2] [--chunk-mib 32]``

A synthetic uint8 stack with the x*y*z background defect, ``16 x Z`` slices, is
written once to a temporary Zarr v3 store (project chunking and compressor).
Then, in this one run, on the threaded scheduler:

* ``read``: every chunk of the first ``Z`` slices read and touched;
* each configuration: its state (the fit) plus its result cast to uint8 and
  touched chunk by chunk (not written); MiB/s of input and ratio to ``read``;
  also the float32 result alone (the engine's cast to uint8 is part of the result);
* the 3-D fit (``compute_state`` only) on the first ``Z``, ``4 Z`` and ``16 Z``
  slices, each in a fresh interpreter: peak RSS of the process tree, and the
  tracemalloc peaks (numpy buffers included) of its two phases: reading the
  samples chunk by chunk (bounded by the chunks in flight) and fitting (the
  gathered samples and the IRLS arrays: this one grows with the samples).
  Twice: without a sample budget (``max_samples = 0``: grows with the stack;
  PyStack3D's 3-D fit holds about 1 kB per sampled voxel), and with
  ``max_samples`` = the samples at ``Z`` slices (flat);
* what the budget costs: the RMS difference between the backgrounds removed
  with ``max_samples`` = 1/8 of the samples (skip factors about doubled) and
  without, relative to the RMS of the background removed, on all ``16 Z`` slices.

Timings vary by 10-15 % from run to run on a shared machine: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import warnings
from pathlib import Path

import dask
import dask.array

sys.path.insert(0, str(Path(__file__).parent))

from common import best, drain, mib, run_python, synthetic_store  # noqa: E402

from pystack3d_dask.steps.bkg_removal import bkg_removal  # noqa: E402

CONFIGS = {
    "dim 3, orders (1,1,1) cross, skip 10": {"orders": (1, 1, 1), "cross_terms": True},
    "dim 3, orders (2,2,2) cross, skip 5": {"orders": (2, 2, 2), "cross_terms": True, "skip_factors": (5, 5, 5)},
    "dim 3, skip 10 averaged, preserve_avg": {"orders": (1, 1, 1), "cross_terms": True, "skip_averaging": True,
                                              "preserve_avg": True, "threshold_min": 5.0},
    "dim 2, orders (2,2) cross, skip 10": {"orders": (2, 2), "cross_terms": True},
}
#: the 3-D fit whose memory is measured (PyStack3D's documented example uses skip 5)
MEMORY_PARAMS = {"orders": (1, 1, 1), "cross_terms": True, "skip_factors": (5, 5, 5)}

CHILD = """
import json, sys, tracemalloc
import dask, dask.array as da, zarr
from pystack3d_dask.steps.base import StepContext
from pystack3d_dask.steps.bkg_removal import STEP
z = zarr.open_array(sys.argv[1], mode="r")
x = da.from_zarr(z, chunks=z.chunks)[: int(sys.argv[2])]
params = STEP.params(json.loads(sys.argv[3]))
compute, marks = dask.compute, {}
def compute_then_mark(*args, **kwargs):  # splits the read phase from the fit phase
    out = compute(*args, **kwargs)
    marks["read_peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    return out
dask.compute = compute_then_mark
tracemalloc.start()
with dask.config.set(scheduler="threads"):
    STEP.state(x, params, StepContext())
marks["fit_peak"] = tracemalloc.get_traced_memory()[1]
print(json.dumps(marks))
"""


def samples(shape: tuple[int, int, int], skip: tuple[int, int, int]) -> int:
    """Sampled voxels of the 3-D fit (skip = (sx, sy, sz))."""
    return math.prod(math.ceil(n / s) for n, s in zip(shape, skip[::-1]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 1024, 1024), metavar=("Z", "Y", "X"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--chunk-mib", type=float, default=32.0,
                        help="chunk size; memory ratios need several chunks at 1x (reading holds a few at once)")
    args = parser.parse_args(argv)
    nz, h, w = args.shape
    with tempfile.TemporaryDirectory() as tmp, dask.config.set(scheduler="threads"):
        store = f"{tmp}/stack.zarr"
        full = synthetic_store(store, (16 * nz, h, w), defects=("background",), chunk_mib=args.chunk_mib)
        x = full[:nz]
        size = mib(x.nbytes)
        print(f"stack ({nz}, {h}, {w}) uint8 = {size:.0f} MiB, chunks of {x.chunks[0][0]} slices, "
              f"{dask.system.CPU_COUNT} threads, best of {args.repeat}")
        read = best(lambda: drain(x), args.repeat)
        print(f"{'read':42s} {read:7.2f} s {size / read:8.1f} MiB/s  ratio to read 1.00")
        for name, params in CONFIGS.items():
            fit = best(lambda: bkg_removal(x, **params), args.repeat)  # the result is lazy: state only
            state = bkg_removal(x, **params)[1]
            result = best(lambda: drain(bkg_removal(x, state=state, **params)[0]), args.repeat)
            floats = best(lambda: drain(bkg_removal(x, state=state, cast=False, **params)[0]), args.repeat)
            total = fit + result
            print(f"{name:42s} {total:7.2f} s {size / total:8.1f} MiB/s  ratio to read {read / total:5.2f}"
                  f"  (fit {fit:.2f} s, result {result:.2f} s, float32 before the cast {floats:.2f} s)")

        skip = MEMORY_PARAMS["skip_factors"]
        budget = samples((nz, h, w), skip)
        for max_samples in (0, budget):
            params = {**MEMORY_PARAMS, "max_samples": max_samples}
            runs = {}
            for scale in (1, 4, 16):
                n = min(samples((scale * nz, h, w), skip), max_samples or math.inf)
                seconds, rss, out = run_python(CHILD, store, str(scale * nz), json.dumps(params))
                marks = json.loads(out.strip().splitlines()[-1])
                runs[scale] = rss
                print(f"3-D fit {params} on {scale * nz} slices, at most {n} sampled voxels: {seconds:.1f} s, "
                      f"peak RSS {mib(rss):.0f} MiB; traced peaks: reading {mib(marks['read_peak']):.0f} MiB, "
                      f"fitting {mib(marks['fit_peak']):.0f} MiB")
            print(f"max_samples = {max_samples}: peak RSS at 4x / 1x {runs[4] / runs[1]:.2f}, "
                  f"at 16x / 1x {runs[16] / runs[1]:.2f} (target with a budget: <= 1.2)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref, _ = bkg_removal(full, cast=False, **MEMORY_PARAMS, max_samples=0)
            eighth = samples(full.shape, skip) // 8
            coarse, _ = bkg_removal(full, cast=False, **MEMORY_PARAMS, max_samples=eighth)
        removed = rms(full.astype("f4") - ref)
        print(f"background with max_samples = {eighth} (skip factors about doubled) vs without: RMS difference "
              f"{rms(coarse - ref):.4f} grey levels = {rms(coarse - ref) / removed:.2e} of the background "
              f"removed (RMS {removed:.2f})")


def rms(x) -> float:
    return float(dask.array.sqrt((x.astype("f8") ** 2).mean()).compute())


if __name__ == "__main__":
    main()
