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
