"""Throughput of intensity_rescaling and intensity_rescaling_area, relative to a plain read.

Run: ``python benchmarks/bench_intensity.py [--shape 64 1024 1024] [--dtype uint8] [--repeat 3]``

A synthetic stack (contrast defect) is written to a temporary Zarr v3 store
with the project's chunking and compressor; then, on the threaded scheduler,
in the same run, the best of ``--repeat`` timings of:

* ``read``: every chunk read and touched (the floor any step pays);
* each step: its global state (its reads of the stack), then its result
  computed chunk by chunk and cast to the input dtype (not written); the
  line gives both parts, and the time of the float32 result without the cast.

Each line gives MiB/s of input and the ratio to the plain read (1.0 = as fast
as reading).  Timings vary by 10-15 % from run to run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import dask
import numpy as np

from pystack3d_dask.steps.intensity_rescaling import intensity_rescaling
from pystack3d_dask.steps.intensity_rescaling_area import intensity_rescaling_area

sys.path.insert(0, str(Path(__file__).parent))
from common import best, drain, synthetic_store  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 1024, 1024), metavar=("Z", "Y", "X"))
    parser.add_argument("--dtype", default="uint8", choices=("uint8", "uint16", "float32"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    mib = np.prod(shape) * np.dtype(args.dtype).itemsize / 2**20
    top = 255.0 if args.dtype == "float32" else float(np.iinfo(args.dtype).max)
    steps = {
        "intensity_rescaling (filter_size=10)": (intensity_rescaling, {}),
        "intensity_rescaling (range_bins given)": (intensity_rescaling, {"range_bins": (0.0, top)}),
        "intensity_rescaling_area": (intensity_rescaling_area, {"factors_range": (0.5, 2.5)}),
    }
    with tempfile.TemporaryDirectory() as tmp, dask.config.set(scheduler="threads"):
        x = synthetic_store(f"{tmp}/stack.zarr", shape, defects=("contrast",), dtype=args.dtype)
        print(f"stack {shape} {args.dtype} = {mib:.0f} MiB, chunks of {x.chunks[0][0]} slices, "
              f"{dask.system.CPU_COUNT} threads, best of {args.repeat}")
        read = best(lambda: drain(x), args.repeat)
        print(f"{'read':40s} {read:7.3f} s {mib / read:8.1f} MiB/s  ratio to read  1.00")
        for name, (func, params) in steps.items():
            state = func(x, **params)[1]
            t_state = best(lambda: func(x, **params), args.repeat)  # state only: the result is lazy
            t_result = best(lambda: drain(func(x, state=state, **params)[0]), args.repeat)
            t_float = best(lambda: drain(func(x, state=state, cast=False, **params)[0]), args.repeat)
            total = t_state + t_result
            print(f"{name:40s} {total:7.3f} s {mib / total:8.1f} MiB/s  ratio to read {read / total:5.2f}"
                  f"  (state {t_state:.3f} s, result {t_result:.3f} s of which float32 before the cast "
                  f"{t_float:.3f} s)")


if __name__ == "__main__":
    main()
