"""Throughput cost of the integrity features: chunk checksums, write beside and swap, completeness checks.

    python benchmarks/bench_integrity.py [--shape 128,1024,1024] [--repeat 3]

Ingests a synthetic TIFF folder and runs a copy-like step (``cropping`` one
column off: pure read and write, the worst case for a per-byte cost) with the
integrity features on, then off, alternating in one process.  "Off" keeps the
store's layout and its writers (a format-3 store's shards are streamed by
:func:`pystack3d_dask.store.write_shard` only in that layout; without the
checksum codec Zarr's own shard writer would run, a different and slower
path) and makes every CRC32C computation return 0, on write and on read: what
is left out is exactly the checksums' cost.  The swap and the completeness
check stay (a rename and a directory listing).  Printed: the best wall and CPU
times of each, as ratios on/off for ingest and for the step (target <= 1.05),
and the time spent computing checksums in the "on" runs as a share of their
wall time: the direct measure, steadier than a ratio of two runs of a second
whose system time (page cache, file writes) varies by 10 % from run to run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import google_crc32c

from common import noise_slices

import pystack3d_dask.store as store
from pystack3d_dask.engine import Project

PARAMS = 'process_steps = ["cropping"]\n[cropping]\narea = [1, 99999, 0, 99999]\n'


#: the integrity features: on, off (every CRC32C computed as 0: same layout, same writers)
KINDS = ("on", "off")


def _run(folder: Path, kind: str) -> dict[str, tuple[float, float, float]]:
    """(wall, CPU, checksum) seconds of the ingest and of the step; CPU time is what the features
    add and is steadier than wall time on a shared machine."""
    shutil.rmtree(folder / store.STORE_NAME, ignore_errors=True)
    crc, spent = google_crc32c.value, [0.0]

    def timed(data) -> int:
        start = time.perf_counter()
        try:
            return crc(data)
        finally:
            spent[0] += time.perf_counter() - start

    # the store, its codec and Zarr's all call google_crc32c.value at run time
    google_crc32c.value = timed if kind == "on" else (lambda data: 0)
    out = {}
    try:
        for phase, steps in (("input", []), ("cropping", None)):
            wall, cpu, spent[0] = time.perf_counter(), time.process_time(), 0.0
            Project(folder, quiet=True).run(steps, plots=False)
            out[phase] = (time.perf_counter() - wall, time.process_time() - cpu, spent[0])
    finally:
        google_crc32c.value = crc
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="128,1024,1024")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n, h, w = (int(v) for v in args.shape.split(","))
    folder = Path(tempfile.mkdtemp(prefix="bench_integrity_"))
    try:
        noise_slices(folder, (n, h, w))
        (folder / "params.toml").write_text(PARAMS)
        _run(folder, "on")  # warm the page cache and the imports
        times: dict[str, list[dict[str, tuple[float, float, float]]]] = {kind: [] for kind in KINDS}
        for i in range(args.repeat):
            for kind in KINDS[:: 1 if i % 2 else -1]:  # alternating which goes first (page cache, allocator)
                times[kind].append(_run(folder, kind))
        size = n * h * w / 2**20
        print(f"stack {n} x {h} x {w} uint8 ({size:.0f} MiB), best of {args.repeat}, threads, one process")
        for step in ("input", "cropping"):
            best = {kind: [min(t[step][i] for t in times[kind]) for i in (0, 1)] for kind in KINDS}
            off, on = best["off"], best["on"]
            share = max(t[step][2] / t[step][0] for t in times["on"])
            print(f"{step:9s} off {size / off[0]:6.0f} MiB/s  on: wall {on[0] / off[0]:.3f} "
                  f"CPU {on[1] / off[1]:.3f}  checksums {share:.1%} of the wall time (the largest)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
