"""Throughput cost of the integrity features: chunk checksums, write beside and swap, completeness checks.

    python benchmarks/bench_integrity.py [--shape 128,1024,1024] [--repeat 3]

Ingests a synthetic TIFF folder and runs a copy-like step (``cropping`` one
column off: pure read and write, the worst case for a per-byte cost) with the
integrity features on, then off (``store.CHECKSUM = ()``; the swap and the
completeness check stay: they cost a rename and a directory listing),
alternating in one process.  Printed: the best wall and CPU times of each, as
ratios on/off for ingest and for the step (target <= 1.05); the CPU ratio is
the steadier one on a shared machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

import pystack3d_dask.store as store
from pystack3d_dask.engine import Project

PARAMS = 'process_steps = ["cropping"]\n[cropping]\narea = [1, 99999, 0, 99999]\n'


def _run(folder: Path, integrity: bool) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of the ingest and of the step; CPU time is what the features add and
    is steadier than wall time on a shared machine."""
    shutil.rmtree(folder / store.STORE_NAME, ignore_errors=True)
    saved = store.CHECKSUM
    if not integrity:
        store.CHECKSUM = ()
    out = {}
    try:
        for phase, steps in (("input", []), ("cropping", None)):
            wall, cpu = time.perf_counter(), time.process_time()
            Project(folder, quiet=True).run(steps, plots=False)
            out[phase] = (time.perf_counter() - wall, time.process_time() - cpu)
    finally:
        store.CHECKSUM = saved
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="128,1024,1024")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n, h, w = (int(v) for v in args.shape.split(","))
    folder = Path(tempfile.mkdtemp(prefix="bench_integrity_"))
    try:
        rng = np.random.default_rng(0)
        for k in range(n):
            tifffile.imwrite(folder / f"slice_{k}.tif", rng.integers(0, 256, (h, w), np.uint8))
        (folder / "params.toml").write_text(PARAMS)
        _run(folder, True)  # warm the page cache and the imports
        times: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for _ in range(args.repeat):
            for integrity in (True, False):
                times[integrity].append(_run(folder, integrity))
        size = n * h * w / 2**20
        print(f"stack {n} x {h} x {w} uint8 ({size:.0f} MiB), best of {args.repeat}, threads, one process")
        for step in ("input", "cropping"):
            on = [min(t[step][i] for t in times[True]) for i in (0, 1)]
            off = [min(t[step][i] for t in times[False]) for i in (0, 1)]
            print(f"{step:9s} on {size / on[0]:6.0f} MiB/s  off {size / off[0]:6.0f} MiB/s  "
                  f"wall on/off {on[0] / off[0]:.3f}  CPU on/off {on[1] / off[1]:.3f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
