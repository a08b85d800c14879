"""Files and throughput of a sharded store: shards of several chunks vs one file per chunk.

    python benchmarks/bench_shards.py [--shape 256,1024,1024] [--chunk-mib 8] [--shard-mib 0,64,256] [--repeat 2]

Ingests a synthetic TIFF folder and runs a copy-like step (``cropping`` one
column off: pure read and write, where a per-file or per-shard cost shows most)
for each shard size, alternating in one process (``0``: unsharded, one file per
chunk, the layout of stores of format 2, and the reference).  Printed per shard
size: the files one step adds to the store, and the best wall and CPU times of
the ingest and of the step as ratios to the unsharded run (threads, one process).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import noise_slices

from pystack3d_dask.engine import Project
from pystack3d_dask.store import STORE_NAME

PARAMS = 'process_steps = ["cropping"]\n[cropping]\narea = [1, 99999, 0, 99999]\n'


def _run(folder: Path, chunk_mib: float, shard_mib: float) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of the ingest and of the step."""
    shutil.rmtree(folder / STORE_NAME, ignore_errors=True)
    out = {}
    for phase, steps in (("input", []), ("cropping", None)):
        wall, cpu = time.perf_counter(), time.process_time()
        Project(folder, quiet=True, chunk_mib=chunk_mib, shard_mib=shard_mib).run(steps, plots=False)
        out[phase] = (time.perf_counter() - wall, time.process_time() - cpu)
    return out


def _files(folder: Path, step: str) -> int:
    """Data files of ``step``'s group (its images and tables; metadata files left out)."""
    return sum(1 for p in (folder / STORE_NAME / step).rglob("*") if p.is_file() and p.name != "zarr.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="256,1024,1024")
    parser.add_argument("--chunk-mib", type=float, default=8.0)
    parser.add_argument("--shard-mib", default="0,64,256", help="shard sizes to compare; 0 (unsharded) first")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    n, h, w = (int(v) for v in args.shape.split(","))
    shards = [float(v) for v in args.shard_mib.split(",")]
    if shards[0] != 0:
        shards.insert(0, 0.0)
    folder = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    try:
        noise_slices(folder, (n, h, w))
        (folder / "params.toml").write_text(PARAMS)
        _run(folder, args.chunk_mib, shards[-1])  # warm the page cache and the imports
        times: dict[float, list[dict]] = {s: [] for s in shards}
        files = {}
        for _ in range(args.repeat):
            for shard in shards:
                times[shard].append(_run(folder, args.chunk_mib, shard))
                files[shard] = _files(folder, "cropping")
        size = n * h * w / 2**20
        print(f"stack {n} x {h} x {w} uint8 ({size:.0f} MiB), chunks of {args.chunk_mib:g} MiB, best of "
              f"{args.repeat}, threads, one process; ratios to unsharded (> 1: slower)")
        print(f"{'shard MiB':>10}{'files/step':>11}{'ingest MiB/s':>13}{'wall':>7}{'CPU':>7}"
              f"{'step MiB/s':>11}{'wall':>7}{'CPU':>7}")
        best = {s: {step: [min(t[step][i] for t in times[s]) for i in (0, 1)] for step in ("input", "cropping")}
                for s in shards}
        for shard in shards:
            row = f"{shard:>10g}{files[shard]:>11d}"
            for step, width in (("input", 13), ("cropping", 11)):
                wall, cpu = best[shard][step]
                ref = best[0.0][step]
                row += f"{size / wall:>{width}.0f}{wall / ref[0]:>7.2f}{cpu / ref[1]:>7.2f}"
            print(row)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
