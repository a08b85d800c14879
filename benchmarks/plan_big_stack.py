"""Paper plan for a stack too big to try: every step's graph built, never computed.

    python benchmarks/plan_big_stack.py [--shape 10000,8192,8192] [--dtype uint16] [--threads 64]

The input is a Zarr array with no chunk written (metadata only), as the engine
would open the ingested stack; each step reads the previous step's result the
same way.  A step's global state is computed from a small stack of the same
dtype and its per-slice rows repeated to the big stack's length (the plan is
about graph and store sizes, not values); the states that need no data
(:data:`DATA_FREE`) are computed for the big stack itself, under a scheduler
that refuses to run anything.

Printed per step: output shape, tasks in the step's graph, graph build time
(state included), write tasks (one per shard, plus one per chunk casting it
when a shard holds several), files the step adds to the store (a shard file
per result, statistics and write-pass table; "unsharded": a file per chunk of
each, as in stores of format 2), the driver memory the graph takes
(tracemalloc peak while building it), and the scheduler's share: the step's
materialised graph pickled with cloudpickle, as a client sends it (``graph``),
and the part of it the scheduler holds at once (``window``): the engine
submits the writes in a window (2 chunks per worker thread, ``--threads``, at
least 2 writes), each with only the tasks it depends on.  Then the peak memory
of one worker thread (two chunks in flight and the heaviest kernel, VSNR: about
13x the float32 slice) and what changes for slices of twice the side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import cloudpickle
import dask
import dask.array as da
import numpy as np
import zarr

from pystack3d_dask.engine import CHUNK_MIB, SHARD_MIB
from pystack3d_dask.kernels.vsnr_tiles import vsnr_bytes
from pystack3d_dask.progress import _window
from pystack3d_dask.project_config import load_config
from pystack3d_dask.steps import get_step
from pystack3d_dask.steps.base import StepContext, default_chunk_slices, run_step
from pystack3d_dask.store import shard_slices

CONFIG = Path(__file__).parents[1] / "configs" / "pystack3d_params.toml"
#: z spacing of the plan's slices (micrometres)
DZ = 0.01
#: slices of the small stack the data-dependent states come from (enough for a 3-D fit at skip 10)
NSMALL = 40
#: steps whose state comes from parameters and earlier states only
DATA_FREE = ("registration_transformation", "resampling")
def _refuse(*args, **kwargs):
    raise RuntimeError("the plan tried to compute data")


def _lazy_input(folder: Path, name: str, shape: tuple[int, ...], dtype, cz: int, sz: int) -> da.Array:
    arr = zarr.create_array(folder / f"{name}.zarr", shape=shape, chunks=(cz,) + shape[1:],
                            shards=(sz,) + shape[1:], dtype=dtype, fill_value=0)
    return da.from_zarr(arr, chunks=arr.chunks)  # by chunk, as the engine reads


def _stretch(value, small: int, big: int):
    """Repeat the per-slice rows of a state value from ``small`` to ``big`` slices."""
    if isinstance(value, np.ndarray) and value.ndim and value.shape[0] == small:
        return np.resize(value, (big,) + value.shape[1:])
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="10000,8192,8192", help="N,H,W of the stack")
    parser.add_argument("--dtype", default="uint16")
    parser.add_argument("--threads", type=int, default=64, help="worker threads of the cluster (write window)")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    dtype = np.dtype(args.dtype)
    cfg = load_config(CONFIG)
    folder = Path(tempfile.mkdtemp(prefix="plan_"))
    small = np.random.default_rng(0).integers(10, 200, (NSMALL, 96, 96)).astype(dtype)
    small_states, big_states = {}, {}
    zpos = np.arange(shape[0]) * DZ
    gib = shape[1] * shape[2] * dtype.itemsize / 2**30 * shape[0]
    cz = default_chunk_slices(shape, dtype, target_mib=CHUNK_MIB)
    sz = shard_slices(shape, dtype, cz, target_mib=SHARD_MIB)
    print(f"{shape[0]} x {shape[1]} x {shape[2]} {dtype} ({gib:,.0f} GiB), chunks of about {CHUNK_MIB:g} MiB "
          f"({cz} slice(s)), shards of about {SHARD_MIB:g} MiB ({sz} slices)")
    window = _window(args.threads, -(-sz // cz))  # write tasks in flight
    print(f"{'':<29}{'':>24}{'':>9}{'':>9}{'':>8}{'':>8}{'':>10}{'driver':>8}{'scheduler MiB':>16}")
    print(f"{'step':<29}{'output shape':>24}{'tasks':>9}{'build s':>9}{'writes':>8}{'files':>8}{'unsharded':>10}"
          f"{'MiB':>8}{'graph':>8}{'window':>8}")
    for name in cfg.process_steps:
        step, params = get_step(name), cfg.step_params[name]
        x = _lazy_input(folder, name, shape, dtype, cz, sz)
        out_small, small_states[name] = run_step(step, small, zpos=np.arange(NSMALL) * DZ, previous=small_states,
                                                 **{f.name: getattr(params, f.name) for f in _fields(params)})
        small = out_small.compute()
        ctx = StepContext(zpos=zpos, nproc=2, previous=big_states)
        tracemalloc.start()
        start = time.perf_counter()
        with dask.config.set(scheduler=_refuse):
            if name in DATA_FREE:
                state = step.state(x, params, ctx)
            else:
                state = {k: _stretch(v, NSMALL, shape[0]) for k, v in small_states[name].items()}
                if "shape" in state:  # the slice size the state was computed on
                    state["shape"] = list(shape[1:])
            out = step.apply(x, params, state, ctx)
        build = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        big_states[name] = state
        if out is None:
            print(f"{name:<29}{'(images unchanged)':>24}{0:9d}{build:9.2f}{0:8d}{0:8d}{0:10d}{peak:8.1f}{0:8.1f}"
                  f"{0:8.1f}")
            continue
        graph = dict(out.__dask_graph__())
        pickled = len(cloudpickle.dumps(graph)) / 2**20
        chunks, shards = -(-out.shape[0] // cz), -(-out.shape[0] // sz)
        writes = shards + (chunks if sz > cz else 0)
        tables = 2 + (step.write_reduction is not None)
        print(f"{name:<29}{str(out.shape):>24}{len(graph):9d}{build:9.2f}{writes:8d}{shards * tables:8d}"
              f"{chunks * tables:10d}{peak:8.1f}{pickled:8.1f}{pickled * min(1, window / shards):8.1f}")
        shape, zpos = out.shape, np.asarray(state.get("zpos", zpos), float)
    cvg = cfg.step_params["destriping"].cvg_threshold
    _worker_memory(shape, dtype, cvg_threshold=cvg)
    _worker_memory((shape[0], 2 * shape[1], 2 * shape[2]), dtype, cvg_threshold=cvg)
    print("  a whole-slice VSNR past a worker's memory: x-tiled VSNR with overlap ([destriping] memory_budget, "
          "issue 12) bounds it by the tile width")


def _worker_memory(shape: tuple[int, ...], dtype: np.dtype, *, cvg_threshold: float) -> None:
    """Print the peak memory of one worker thread: two chunks in flight and a whole-slice VSNR."""
    cz = default_chunk_slices(shape, dtype, target_mib=CHUNK_MIB)
    chunk = cz * shape[1] * shape[2] * dtype.itemsize / 2**30
    vsnr = vsnr_bytes(shape[1:], cvg_threshold=cvg_threshold) / 2**30
    factor = vsnr * 2**30 / (shape[1] * shape[2] * 4)
    print(f"{shape[1]} x {shape[2]}: per worker thread about {2 * chunk + vsnr:,.1f} GiB = 2 chunks of {cz} "
          f"slice(s) ({chunk:,.2f} GiB each) + VSNR on one slice ({factor:g}x float32: {vsnr:,.1f} GiB)")


def _fields(params):
    import dataclasses

    return dataclasses.fields(params)


if __name__ == "__main__":
    main()
