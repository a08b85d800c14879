"""VSNR in x-tiles vs the whole slice: agreement at 2048^2, time and peak memory at 4096^2.

Run: ``python benchmarks/bench_vsnr_tiles.py [--quick] [--sweep] [--size 4096] [--maxit 30]``

1. Agreement, 2048 x 2048 curtained uint8 slice, PyStack3D's Gabor (20,
   [0.5, 200], 0), 4 tiles (the budget that plans exactly 4): relative RMS of
   tiled - untiled beyond 32 px of the outer edges, with a fixed count
   (``--maxit``, ``cvg_threshold = 0``) and with PyStack3D's stopping rule
   (``maxit = 100``, ``cvg_threshold = 1e-2``); for the latter also the
   iterations of the slice, of the tiles (their proxy's count) and of the
   first tile's own stopping rule (what the tiles ran before the proxy), and
   how far from the untiled result the tiles would be at that count.
   ``--sweep``: the same on 15 curtained slices from 512 x 768 to 4096 x 1024,
   2-4 tiles, with and without added noise, on the demo's 8 curtained
   slices at 1024^2 to 4096 x 1024 in 4 and 8 tiles, and with 3 other filter
   sets (~15 min).
2. Cost, one ``--size``^2 slice through the destriping step (threaded
   scheduler, one slice, ``--maxit`` iterations), each in a fresh interpreter:
   untiled, and with ``memory_budget`` at 1/2 and 1/4 of what the untiled
   slice needs (when even the narrowest tiles fit).  Printed: tiles, seconds and peak RSS above the process's RSS
   once the slice is in memory, and their ratios to the untiled run.

This machine is shared: compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_vsnr import FILTERS, curtained_slices  # noqa: E402
from common import run_python  # noqa: E402

from pystack3d_dask.kernels.vsnr import vsnr  # noqa: E402
from pystack3d_dask.kernels.vsnr_tiles import (  # noqa: E402
    _slice_rms,
    default_overlap,
    plan_tiles,
    tile_width,
    tiled_bytes,
    vsnr_tiles,
)
from pystack3d_dask.synthetic import SyntheticCase  # noqa: E402

EDGE = 32
#: (shape, tiles, seed, added noise RMS) of --sweep
SWEEP = [((2048, 2048), 4, 0, 0), ((2048, 2048), 4, 1, 0), ((2048, 2048), 4, 2, 5),
         ((1024, 904), 2, 0, 0), ((1024, 904), 2, 1, 0), ((1024, 904), 2, 2, 0), ((1024, 904), 2, 0, 5),
         ((1024, 1024), 4, 2, 0), ((1024, 1024), 4, 0, 0), ((4096, 1024), 4, 0, 0),
         ((4096, 1024), 4, 1, 0), ((512, 1024), 4, 0, 0), ((512, 1024), 4, 1, 0), ((512, 768), 2, 0, 0),
         ((768, 1024), 4, 0, 0)]

#: the child: one slice through the step; prints tiles, seconds, RSS before and peak RSS above it
CHILD = r"""
import sys, time, os
sys.path.insert(0, sys.argv[1])
import numpy as np, psutil
from bench_vsnr import FILTERS, curtained_slices
from common import PeakMemory
from pystack3d_dask.kernels.vsnr_tiles import default_overlap, plan_tiles
from pystack3d_dask.steps.destriping import destriping
size, maxit, budget = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
img = curtained_slices(1, (size, size))
kw = {} if budget == 0 else {"memory_budget": budget}
tiles = 1 if budget == 0 else plan_tiles((size, size), budget=budget,
                                         overlap=default_overlap(FILTERS, ny=size))
out, _ = destriping(img, filters=FILTERS, maxit=maxit, cvg_threshold=0, **kw)
base = psutil.Process().memory_info().rss
with PeakMemory(os.getpid(), interval=0.01) as mem:
    t = time.perf_counter()
    out.compute(scheduler="threads", num_workers=1)
    seconds = time.perf_counter() - t
print(tiles, seconds, mem.peak - base)
"""


def rel_rms(a, b) -> float:
    d = (np.asarray(a, np.float64) - b)[:, EDGE:-EDGE]
    return float(np.sqrt(np.mean(d**2) / np.mean(np.asarray(b, np.float64)[:, EDGE:-EDGE] ** 2)))


def first_tile_count(img, *, tiles: int, overlap: int, filters) -> int:
    """The count the first tile's own stopping rule picks (what every tile ran before the proxy)."""
    cols = (np.arange(tile_width(img.shape[1], tiles=tiles, overlap=overlap)) - overlap) % img.shape[1]
    scale = img.max()
    _, its = vsnr(img[:, cols], filters=filters, maxit=100, cvg_threshold=1e-2, scale=[scale],
                  rms=[_slice_rms(img, scale, np)], return_iterations=True)
    return int(its[0])


def stopping(img, tiles: int, filters=FILTERS) -> str:
    """Counts and relative RMS from the untiled result at ``cvg_threshold = 1e-2``."""
    overlap = default_overlap(filters, ny=img.shape[0])
    kw = dict(filters=filters, maxit=100, cvg_threshold=1e-2, return_iterations=True)
    ref, its = vsnr(img, **kw)
    # what the step runs for a budget of this many tiles (tests: the same bits as the step)
    out, tiled_its = vsnr_tiles(img, tiles=tiles, overlap=overlap, **kw)
    first = first_tile_count(img, tiles=tiles, overlap=overlap, filters=filters)
    before = vsnr_tiles(img, tiles=tiles, overlap=overlap, filters=filters, maxit=first)
    return (f"iterations slice {its[0]}, tiles (proxy) {tiled_its[0]}, first tile's rule {first}; "
            f"relative RMS tiled vs untiled {rel_rms(out, ref):.2e} (at the first tile's count "
            f"{rel_rms(before, ref):.2e})")


def agreement(size: int, maxit: int) -> None:
    img = curtained_slices(1, (size, size))[0].astype(np.float32)
    overlap = default_overlap(FILTERS, ny=size)
    print(f"\n== agreement, {size}^2, 4 tiles, overlap {overlap} px, beyond {EDGE} px of the outer edges ==")
    budget = tiled_bytes(img.shape, tiles=4, overlap=overlap, cvg_threshold=1e-2)
    assert plan_tiles(img.shape, budget=budget, overlap=overlap, cvg_threshold=1e-2) == 4
    ref = vsnr(img, filters=FILTERS, maxit=maxit)
    out = vsnr_tiles(img, tiles=4, overlap=overlap, filters=FILTERS, maxit=maxit)
    print(f"maxit {maxit}, cvg 0: relative RMS tiled vs untiled {rel_rms(out, ref):.2e} "
          f"(correction: {rel_rms(img, ref):.2e} of the image)", flush=True)
    print(f"maxit 100, cvg 1e-2: {stopping(img, 4)}", flush=True)


def sweep() -> None:
    print(f"\n== stopping rule, cvg_threshold 1e-2, beyond {EDGE} px of the outer edges ==")
    for size, tiles, seed, noise in SWEEP:
        img = curtained_slices(1, size, seed=seed)[0].astype(np.float32)
        img += np.random.default_rng(seed).normal(0, noise, size).astype(np.float32)
        print(f"{size[0]}x{size[1]} {tiles} tiles seed {seed} noise {noise}: {stopping(img, tiles)}",
              flush=True)
    # the demo's curtained slices as the chain hands them to destriping (no background, no border)
    for size, tiles in (((1024, 1024), 4), ((2048, 2048), 4), ((4096, 1024), 4), ((1024, 2048), 8)):
        case = SyntheticCase((300,) + size, defects=("curtains",))
        for k in case.curtain_slices:
            img = case.defect_slice(int(np.flatnonzero(case.kept == k)[0])).astype(np.float32)
            print(f"demo {size[0]}x{size[1]} slice {k} {tiles} tiles: {stopping(img, tiles)}", flush=True)
    gabor = FILTERS[0]
    for label, filters in (("theta 10", [{**gabor, "theta": 10}]),
                           ("sigma [3, 200]", [{**gabor, "sigma": (3, 200)}]),
                           ("+ Dirac 0.35", [gabor, {"name": "Dirac", "noise_level": 0.35}])):
        for seed in (0, 1):
            img = curtained_slices(1, (1024, 1536), seed=seed)[0].astype(np.float32)
            print(f"{label} 1024x1536 3 tiles seed {seed}: {stopping(img, 3, filters)}", flush=True)


def cost(size: int, maxit: int) -> None:
    need = tiled_bytes((size, size), tiles=1, overlap=0)
    print(f"\n== cost, one {size}^2 slice through the step, {maxit} iterations, one thread "
          f"(untiled model: {need / 2**20:.0f} MiB) ==")
    bench = str(Path(__file__).parent)
    rows = []
    overlap = default_overlap(FILTERS, ny=size)
    for label, budget in (("untiled", 0), ("budget 1/2", need // 2), ("budget 1/4", need // 4)):
        try:
            budget and plan_tiles((size, size), budget=budget, overlap=overlap)
        except ValueError as exc:
            print(f"{label:11s} {exc}")
            continue
        _, _, out = run_python(CHILD, bench, str(size), str(maxit), str(budget))
        tiles, seconds, peak = out.split()[-3:]
        rows.append((label, budget, int(tiles), float(seconds), int(peak)))
        print(f"{label:11s} tiles {tiles:>2s}  {float(seconds):7.1f} s  peak +{int(peak) / 2**20:7.0f} MiB"
              + (f"  (budget {budget / 2**20:.0f} MiB)" if budget else ""), flush=True)
    _, _, _, t0, m0 = rows[0]
    for label, budget, tiles, seconds, peak in rows[1:]:
        print(f"{label}: {tiles} tiles, time x{seconds / t0:.2f}, peak memory x{peak / m0:.2f} of untiled; "
              f"peak / budget {peak / budget:.2f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1024^2 agreement, 2048^2 cost, 10 iterations")
    ap.add_argument("--size", type=int, default=4096, help="slice size of the cost comparison")
    ap.add_argument("--maxit", type=int, default=30)
    ap.add_argument("--sweep", action="store_true", help="the stopping rule on 29 slices too")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if args.quick:
        agreement(1024, 10)
        cost(2048, 10)
    else:
        agreement(2048, args.maxit)
        cost(args.size, args.maxit)
    if args.sweep:
        sweep()
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
