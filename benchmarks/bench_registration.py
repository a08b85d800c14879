"""Registration: the cost of one pair, the step's overhead around it, and the accuracy of each method.

Run: ``python benchmarks/bench_registration.py [--shape 33,1024,1024 80,600,680 200,300,340] [--nproc 2]
[--repeat 2] [--pystack3d-python /path/to/venv/bin/python] [--accuracy-shape 300 300 300]
[--no-transformation] [--no-accuracy]``

For each ``--shape``, a drifting texture (uint8, ~1.5 px and 0.1 degree per
slice) is written to a temporary Zarr v3 store chunked as the engine's
(about 32 MiB of whole slices), then, in the same run (this machine is
shared: read ratios, not seconds):

* ``pair``: pystackreg (TRANSLATION) and ``phase_correlation`` on a sample
  of the stack's pairs, in this process, one BLAS thread, the heap set as the
  step's pool workers' (glibc's defaults page-fault pystackreg's buffers in
  again at every pair, +20 % CPU: the step's ratio would hide its overhead
  behind that gain); the ratio is the
  speed-up per pair (target >= 10x at 1024^2).  The confidence (NCC after
  alignment) that the step adds to every pair is timed apart.
* ``step``: ``registration_calculation`` with ``nproc`` processes (pool
  start, reading, shipping included), each time in a fresh process as a
  command-line run meets it (light main module, cold fork server; its
  start-up and imports excluded), against ``pairs x pair / nproc``:
  the wall ratio (target <= 1.15) and the CPU ratio (CPU seconds of the main
  process and the workers over the pairs' CPU seconds: the overhead the load
  of other programs cannot hide), interleaved ``--repeat`` times, best kept.
  ``stackreg, in a run``: the same with the workers started beforehand,
  as a run starts them while its first steps compute (the fork server's
  start, ~0.3 s of CPU, is then outside the step).
  ``phase_correlation`` runs in ``nproc`` threads.  ``bare pool`` is the
  floor measured under the same load: a warm pool of ``nproc`` processes
  set up as the step's workers (one BLAS thread, the same heap thresholds)
  registering the pairs of an in-memory stack, split evenly, with nothing
  else (no start-up, reading, confidence or scheduling); the step's ratio to
  it is the overhead when the machine is shared.
* ``PyStack3D``: with ``--pystack3d-python`` (a Python where ``pip install
  pystack3d`` was done; PyStack3D is GPL-3 and never imported here), its own
  ``registration_calculation`` step (``Stack3d.eval``, its pool, TIFF reads
  and matrix file included, interpreter start-up and imports excluded) on
  the same slices written as TIFFs, same ``nproc``, interleaved with ours.
  The summary table ends the run.
* ``accuracy``: the synthetic case (shifts only, ``--accuracy-shape``), both
  methods: per-pair error (px) against the known shifts, and the largest
  residual of the cumulative x/y shift with ``subpixel = false`` (the
  demo's setting) and ``true``.
* ``registration_transformation``: warp of every slice, with and without
  cropping, relative to a plain read.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import subprocess
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
from pystack3d_dask.steps.base import default_chunk_slices
from pystack3d_dask.process_settings import pool_worker, set_heap_thresholds
from pystack3d_dask.processes import WORKER_HEAP
from pystack3d_dask.steps.registration_calculation import registration_calculation
from pystack3d_dask.steps.registration_transformation import registration_transformation
from pystack3d_dask.store import COMPRESSION

sys.path.insert(0, str(Path(__file__).parent))
from common import drain  # noqa: E402

METHODS = ("stackreg", "phase_correlation")
#: stackreg with the workers started before the step, as in a run (see OUR_STEP)
IN_RUN = "stackreg, in a run"
#: pairs timed one by one for the cost of one pair (spread over the stack)
SAMPLE_PAIRS = 8
#: PyStack3D's parameter file, reduced to this step
CONFIG = Path(__file__).parents[1] / "configs" / "pystack3d_params.toml"

#: our step as a run of the command line meets it: a fresh process whose main module is light
#: (spawned workers import it again) and whose fork server starts cold; CPU seconds include the pool's.
#: With "run" as a 4th argument, the workers are already started, as the engine starts them with a
#: run while its first steps compute
OUR_STEP = """
import json, sys, time
import dask, dask.array as da, psutil, zarr
from threadpoolctl import threadpool_limits
from pystack3d_dask.processes import kernel_pool, pool
from pystack3d_dask.steps.registration_calculation import registration_calculation

def cpu():  # this process and its descendants: the fork server, the workers alive and those it reaped
    procs = [psutil.Process()] + psutil.Process().children(recursive=True)
    return sum(sum(p.cpu_times()[:4]) for p in procs)

z = zarr.open_array(sys.argv[1], mode="r")
nproc, method, in_run = int(sys.argv[2]), sys.argv[3], sys.argv[4:] == ["run"]
with (dask.config.set(scheduler="threads", num_workers=nproc), threadpool_limits(limits=1, user_api="blas"),
      kernel_pool(nproc if in_run else 1)):
    if in_run:
        [f.result() for f in [pool().submit(time.sleep, 0.2) for _ in range(nproc)]]
    c0, t0 = cpu(), time.perf_counter()
    registration_calculation(da.from_zarr(z, chunks=z.chunks), nproc=nproc, method=method)
    print(json.dumps([time.perf_counter() - t0, cpu() - c0]))
"""

PYSTACK3D_STEP = """
import sys, time
from pystack3d import Stack3d
stack = Stack3d(input_name=sys.argv[1])
start = time.perf_counter()
stack.eval(process_steps=["registration_calculation"], nproc=int(sys.argv[2]), show_pbar=False)
print(time.perf_counter() - start)
"""


def drifting_stack(path: str, shape: tuple[int, int, int]) -> da.Array:
    """Write a texture drifting by ~1.5 px and turning by 0.1 degree per slice; return it lazily."""
    n, h, w = shape
    chunk = default_chunk_slices(shape, np.uint8)
    margin = max(8, int(0.1 * n * 1.5) + 16)
    rng = np.random.default_rng(0)
    big = ndi.gaussian_filter(rng.standard_normal((h + 2 * margin, w + 2 * margin)).astype(np.float32), 3)
    big = 128 + 100 * big / np.abs(big).max()
    z = zarr.create_array(path, shape=shape, chunks=(chunk, h, w), dtype="uint8", compressors=COMPRESSION["none"])
    motion = np.eye(3)
    a = np.deg2rad(0.1)
    step = np.array([[np.cos(a), -np.sin(a), 1.5], [np.sin(a), np.cos(a), -0.7], [0, 0, 1]])
    for start in range(0, n, chunk):
        block = []
        for _ in range(start, min(start + chunk, n)):
            shift = np.eye(3)
            shift[:2, 2] = margin
            block.append(np.rint(warp_affine(big, shift @ motion, mode="edge", rect=(0, h, 0, w))))
            motion = motion @ step
        z[start:start + len(block)] = np.clip(block, 0, 255).astype(np.uint8)
    return da.from_zarr(z, chunks=(chunk, h, w))


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


def pair_costs(stack: da.Array, repeat: int) -> dict[str, tuple[float, float]]:
    """Per method, (wall, CPU) seconds of one pair (mean over a sample of pairs); and of its confidence."""
    set_heap_thresholds(*WORKER_HEAP)
    ks = np.unique(np.linspace(1, stack.shape[0] - 1, SAMPLE_PAIRS).round().astype(int))
    pairs = [(np.asarray(stack[k - 1]), np.asarray(stack[k])) for k in ks]
    out = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for method in METHODS:
            register_pair(*pairs[0], transformation="TRANSLATION", method=method)  # warm-up (imports, caches)
            wall, cpu = measure(lambda: [register_pair(ref, mov, transformation="TRANSLATION", method=method)
                                         for ref, mov in pairs], repeat + 1)
            out[method] = wall / len(pairs), cpu / len(pairs)
        mats = [register_pair(ref, mov, transformation="TRANSLATION", method="phase_correlation")
                for ref, mov in pairs]
        wall, cpu = measure(lambda: [alignment_ncc(ref, mov, m) for (ref, mov), m in zip(pairs, mats)], repeat + 1)
        out["confidence"] = wall / len(pairs), cpu / len(pairs)
    return out


def _pairs(stack: np.ndarray, ks: list[int]) -> list[np.ndarray]:
    return [register_pair(stack[k - 1], stack[k], transformation="TRANSLATION") for k in ks]


def bare_pool(stack: np.ndarray, nproc: int, repeat: int) -> float:
    """Best wall seconds of a warm pool registering ``stack``'s pairs, split evenly, data in memory."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(nproc, mp_context=ctx, initializer=pool_worker, initargs=WORKER_HEAP) as pool:
        for f in [pool.submit(_pairs, stack[:2], [1]) for _ in range(nproc)]:  # start and warm every worker
            f.result()
        return measure(lambda: [f.result() for f in [pool.submit(_pairs, stack, list(range(1 + i, len(stack), nproc)))
                                                   for i in range(nproc)]], repeat)[0]


def pystack3d_folder(stack: da.Array, folder: Path) -> Path:
    """Write ``stack``'s slices as TIFFs and a parameter file running PyStack3D's registration_calculation."""
    import tifffile

    folder.mkdir()
    for k in range(stack.shape[0]):
        tifffile.imwrite(folder / f"slice_{k:05d}.tif", np.asarray(stack[k]))
    return folder


def pystack3d_step(python: str, folder: Path, nproc: int) -> float:
    """Seconds of PyStack3D's own registration_calculation on ``folder`` (a fresh run each time)."""
    text = CONFIG.read_text().replace("nproc = 1", f"nproc = {nproc}")
    start, stop = text.index("process_steps = ["), text.index("]", text.index("process_steps = ["))
    (folder / "params.toml").write_text(text[:start] + 'process_steps = ["registration_calculation"]'
                                        + text[stop + 1:])  # PyStack3D rewrites its history there
    shutil.rmtree(folder / "process", ignore_errors=True)
    out = subprocess.run([python, "-c", PYSTACK3D_STEP, str(folder), str(nproc)], check=True, capture_output=True,
                         text=True).stdout
    return float(out.strip().splitlines()[-1])


def our_step(path: str, nproc: int, method: str) -> tuple[float, float]:
    """(wall, CPU) seconds of our registration_calculation on the Zarr array ``path``, in a fresh process.

    ``method`` "stackreg, in a run": stackreg with the workers started beforehand (see OUR_STEP).
    """
    method, _, in_run = method.partition(", in a ")
    out = subprocess.run([sys.executable, "-c", OUR_STEP, path, str(nproc), method, in_run], check=True,
                         capture_output=True, text=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def step_section(path: str, nproc: int, repeat: int, pystack3d: str | None, tmp: str) -> dict[str, float]:
    """Print the pair and step lines of the stack stored at ``path``; return the summary row."""
    z = zarr.open_array(path, mode="r")
    x = da.from_zarr(z, chunks=z.chunks)
    shape, pairs = x.shape, x.shape[0] - 1
    print(f"\nstack {shape} uint8 = {np.prod(shape) / 2**20:.0f} MiB, chunks of {x.chunks[0][0]} slices, "
          f"TRANSLATION, nproc = {nproc}, {dask.system.CPU_COUNT} CPUs")
    cost = pair_costs(x, repeat)
    (sr_wall, _), (pc_wall, _) = cost["stackreg"], cost["phase_correlation"]
    print(f"pair  stackreg {1e3 * sr_wall:8.1f} ms   phase_correlation {1e3 * pc_wall:7.1f} ms   "
          f"x{sr_wall / pc_wall:5.1f} per pair   (+ confidence {1e3 * cost['confidence'][0]:.1f} ms: "
          f"x{sr_wall / (pc_wall + cost['confidence'][0]):.1f} with it)")
    folder = None if pystack3d is None else pystack3d_folder(x, Path(tmp) / f"tiff_{'x'.join(map(str, shape))}")
    variants = (*METHODS, IN_RUN)
    walls = {method: [] for method in variants}
    cpus = {method: [] for method in variants}
    ps3d = []
    with dask.config.set(scheduler="threads", num_workers=nproc), threadpool_limits(limits=1, user_api="blas"):
        t_bare = bare_pool(np.asarray(x), nproc, repeat)
        for _ in range(repeat):  # interleaved: a change of load hits every contender
            for method in variants:
                wall, cpu = our_step(path, nproc, method)
                walls[method].append(wall)
                cpus[method].append(cpu)
            if folder is not None:
                ps3d.append(pystack3d_step(pystack3d, folder, nproc))
    for method in variants:
        wall, cpu = min(walls[method]), min(cpus[method])
        kernel = method.split(",")[0]
        pair_wall, pair_cpu = cost[kernel][0] + cost["confidence"][0], cost[kernel][1] + cost["confidence"][1]
        ideal = pairs * pair_wall / nproc
        print(f"step  {method:17s} {wall:7.2f} s   pairs x pair / nproc {ideal:7.2f} s   "
              f"wall ratio {wall / ideal:5.2f}   CPU ratio {cpu / (pairs * pair_cpu):5.2f}   "
              f"{pairs / wall:6.1f} pairs/s" + (f"   ratio to bare pool {wall / t_bare:5.2f}"
                                                  if kernel == "stackreg" else ""))
    print(f"bare pool (stackreg, warm, in memory)   {t_bare:7.2f} s")
    ours = min(walls["stackreg"])
    row = {"pairs": pairs, "pair ms": 1e3 * (sr_wall + cost["confidence"][0]),
           "ideal s": pairs * (sr_wall + cost["confidence"][0]) / nproc, "ours s": ours,
           "in a run s": min(walls[IN_RUN]), "bare pool s": t_bare}
    if ps3d:
        row["PyStack3D s"] = min(ps3d)
        print(f"PyStack3D's registration_calculation     {min(ps3d):7.2f} s   ours is x{min(ps3d) / ours:5.2f} faster")
    return row


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
    parser.add_argument("--shape", nargs="+", default=["33,1024,1024", "80,600,680", "200,300,340"],
                        help="Z,Y,X of each stack")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    parser.add_argument("--pystack3d-python", help="a Python where pystack3d is installed: time its step too")
    parser.add_argument("--accuracy-shape", type=int, nargs=3, default=(300, 300, 300), metavar=("Z", "Y", "X"))
    parser.add_argument("--no-transformation", action="store_true", help="skip registration_transformation")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the accuracy on the synthetic case")
    args = parser.parse_args(argv)
    nproc = args.nproc
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(args.shape):
            shape = tuple(int(v) for v in text.split(","))
            x = drifting_stack(f"{tmp}/stack{i}.zarr", shape)
            rows[shape] = step_section(f"{tmp}/stack{i}.zarr", nproc, args.repeat, args.pystack3d_python, tmp)
            if i == 0 and not args.no_transformation:
                transformation_section(x, nproc)
    print(f"\nregistration_calculation (stackreg, TRANSLATION, nproc = {nproc}), best of {args.repeat}:")
    keys = list(dict.fromkeys(k for row in rows.values() for k in row))
    print(f"{'stack':>16}" + "".join(f"{k:>13}" for k in keys) + f"{'ours/ideal':>12}{'run/ideal':>11}{'ours/bare':>11}"
          + (f"{'PS3D/ours':>11}" if "PyStack3D s" in keys else ""))
    for shape, row in rows.items():
        cells = "".join(f"{row[k]:13.0f}" if k == "pairs" else f"{row.get(k, float('nan')):13.2f}" for k in keys)
        ratios = (f"{row['ours s'] / row['ideal s']:12.2f}{row['in a run s'] / row['ideal s']:11.2f}"
                  f"{row['ours s'] / row['bare pool s']:11.2f}")
        if "PyStack3D s" in row:
            ratios += f"{row['PyStack3D s'] / row['ours s']:11.2f}"
        print(f"{'x'.join(map(str, shape)):>16}" + cells + ratios)
    if args.no_accuracy:
        return
    acc = accuracy(tuple(args.accuracy_shape), nproc)
    print(f"accuracy on the synthetic case {tuple(args.accuracy_shape)}, shifts only (px):")
    for method, res in acc.items():
        print(f"  {method:17s} " + "   ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in res.items()))


def transformation_section(x: da.Array, nproc: int) -> None:
    """registration_transformation's warp, with and without cropping, against a plain read."""
    mib = np.prod(x.shape) / 2**20
    with dask.config.set(scheduler="threads", num_workers=nproc), threadpool_limits(limits=1, user_api="blas"):
        t_read = measure(lambda: drain(x), 1)[0]
        _, state = registration_calculation(x, nproc=nproc, method="phase_correlation")
        print(f"{'read':44s} {t_read:7.2f} s {mib / t_read:8.1f} MiB/s")
        for crop in (False, True):
            t = measure(lambda: drain(registration_transformation(x, state, cropping=crop)[0]), 1)[0]
            name = f"registration_transformation, cropping={crop}"
            print(f"{name:44s} {t:7.2f} s {mib / t:8.1f} MiB/s  ratio to read {t_read / t:6.3f}")


if __name__ == "__main__":
    main()
