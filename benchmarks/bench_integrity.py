"""Throughput cost of the integrity features: chunk checksums, write beside and swap, completeness checks.

    python benchmarks/bench_integrity.py [--shape 128,1024,1024] [--repeat 3]

Ingests a synthetic TIFF folder and runs a copy-like step (``cropping`` one
column off: pure read and write, the worst case for a per-byte cost) with the
integrity features on, then off (``store.CHECKSUM = ()``; the swap and the
completeness check stay: they cost a rename and a directory listing), then on
with Zarr's own ``crc32c`` codec instead of :mod:`pystack3d_dask.checksum`'s
(the same bytes, through a fresh copy of every chunk), alternating in one
process.  Printed: the best wall and CPU times of each, as ratios to off for
ingest and for the step (target <= 1.05); the CPU ratio is the steadier one on
a shared machine.
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
import zarr
from zarr.codecs import Crc32cCodec

import pystack3d_dask.store as store
from pystack3d_dask.engine import Project

PARAMS = 'process_steps = ["cropping"]\n[cropping]\narea = [1, 99999, 0, 99999]\n'


#: the integrity features: on, off, on with Zarr's own crc32c codec (checksum, the codec that opens "crc32c")
KINDS = {"on": (store.CHECKSUM, {}), "off": ((), {}),
         "zarr's codec": ((Crc32cCodec(),), {"codecs.crc32c": "zarr.codecs.crc32c_.Crc32cCodec"})}


def _run(folder: Path, kind: str) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of the ingest and of the step; CPU time is what the features add and
    is steadier than wall time on a shared machine."""
    shutil.rmtree(folder / store.STORE_NAME, ignore_errors=True)
    saved = store.CHECKSUM
    store.CHECKSUM, config = KINDS[kind]
    out = {}
    try:
        with zarr.config.set(config):
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
        _run(folder, "on")  # warm the page cache and the imports
        times: dict[str, list[dict[str, tuple[float, float]]]] = {kind: [] for kind in KINDS}
        for _ in range(args.repeat):
            for kind in KINDS:
                times[kind].append(_run(folder, kind))
        size = n * h * w / 2**20
        print(f"stack {n} x {h} x {w} uint8 ({size:.0f} MiB), best of {args.repeat}, threads, one process")
        for step in ("input", "cropping"):
            best = {kind: [min(t[step][i] for t in times[kind]) for i in (0, 1)] for kind in KINDS}
            off = best["off"]
            print(f"{step:9s} off {size / off[0]:6.0f} MiB/s  " + "  ".join(
                f"{kind}: wall {best[kind][0] / off[0]:.3f} CPU {best[kind][1] / off[1]:.3f}"
                for kind in KINDS if kind != "off"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
