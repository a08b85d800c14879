"""Shared benchmark helpers: peak memory of a process tree, plain-read baselines.

Benchmarks print ratios measured in one run (this machine is shared and noisy:
absolute seconds mean little).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import tifffile


class PeakMemory:
    """Sample the resident memory of a process and all its children until stopped (bytes)."""

    def __init__(self, pid: int, interval: float = 0.02):
        self._proc = psutil.Process(pid)
        self._interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            total = 0
            try:
                for p in [self._proc] + self._proc.children(recursive=True):
                    try:
                        total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, total)
            time.sleep(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_python(code: str, *args: str) -> tuple[float, int, str]:
    """Run ``code`` in a fresh interpreter; return (seconds, peak RSS of its tree, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as mem:
        out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed ({proc.returncode}): {out}")
    return time.perf_counter() - start, mem.peak, out


def plain_tiff_read(files: list[Path]) -> float:
    """Seconds to read every file with tifffile, one after the other (the ingest baseline)."""
    import tifffile

    start = time.perf_counter()
    for f in files:
        tifffile.imread(f)
    return time.perf_counter() - start


def plain_store_read(store: Path, node: str) -> float:
    """Seconds to read and decompress every chunk of a Zarr array (a step's baseline)."""
    import zarr

    arr = zarr.open_array(store, path=node, mode="r")
    cz = arr.chunks[0]
    start = time.perf_counter()
    for i in range(0, arr.shape[0], cz):
        np.asarray(arr[i : i + cz])
    return time.perf_counter() - start


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def best(func, repeat: int) -> float:
    """Shortest of ``repeat`` timings of ``func()`` (seconds)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def _last_value(block: np.ndarray) -> np.ndarray:
    # one value per chunk: forces the chunk to be computed without moving it
    return np.array([[[float(block.reshape(-1)[-1])]]])


def drain(x) -> None:
    """Compute every chunk of the dask array ``x`` without gathering it."""
    x.map_blocks(_last_value, chunks=(1, 1, 1), dtype=np.float64).compute()


def noise_slices(folder: Path, shape: tuple[int, int, int]) -> None:
    """Write ``shape[0]`` uniform-noise uint8 TIFF slices (the worst case for compression) into ``folder``."""
    rng = np.random.default_rng(0)
    for k in range(shape[0]):
        tifffile.imwrite(folder / f"slice_{k}.tif", rng.integers(0, 256, shape[1:], np.uint8))


def synthetic_store(path: str, shape: tuple[int, int, int], *, defects: tuple[str, ...], dtype: str = "uint8",
                    chunk_mib: float = 32.0):
    """Stream a synthetic case into a Zarr array (project chunking); return it as a dask array.

    uint16 stacks use the 16-bit range (values x 257).
    """
    import dask.array as da
    import zarr

    from pystack3d_dask.steps.base import default_chunk_slices
    from pystack3d_dask.store import COMPRESSION
    from pystack3d_dask.synthetic import SyntheticCase

    cz = default_chunk_slices(shape, dtype, target_mib=chunk_mib)
    arr = zarr.create_array(path, shape=shape, chunks=(cz,) + tuple(shape[1:]), dtype=dtype,
                            compressors=COMPRESSION["none"])
    case = SyntheticCase(shape, defects=defects)
    scale = 257 if np.dtype(dtype) == np.uint16 else 1
    for start in range(0, shape[0], cz):
        stop = min(start + cz, shape[0])
        arr[start:stop] = np.stack([case.defect_slice(j) for j in range(start, stop)]).astype(dtype) * scale
    return da.from_zarr(arr, chunks=arr.chunks)
