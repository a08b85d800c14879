"""Settings of the processes that compute: glibc's heap thresholds, one BLAS thread.

Light on purpose (no dask): the registration pool's workers import it
before their first task.
"""

from __future__ import annotations

#: allocations from this size up are mmapped and returned to the system when freed
MMAP_THRESHOLD = 16 * 2**20


def set_heap_thresholds(mmap_threshold: int, trim_threshold: int) -> None:
    """Fix glibc's mmap and trim thresholds (bytes) of this process (no-op elsewhere than glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def bound_heap_growth() -> None:
    """Fix glibc's mmap and trim thresholds in this process at :data:`MMAP_THRESHOLD`.

    glibc raises its mmap threshold to the size of each large block freed, up
    to 32 MiB, so chunk-sized buffers then come from the heap, which fragments
    and keeps growing with the number of chunks processed (peak memory +50 % at
    4x the slices).  A fixed 16 MiB threshold keeps slice-sized FFT buffers on
    the fast heap and gives chunk-sized ones back at once: peak memory no longer
    depends on the stack length.  The heap keeps up to as much free at its top
    (trim threshold; glibc's 128 kiB gave each freed slice buffer back, and the
    next one page-faulted in again: 3x the page faults of a 1024² VSNR slice).
    """
    set_heap_thresholds(MMAP_THRESHOLD, MMAP_THRESHOLD)


def pool_worker(mmap_threshold: int, trim_threshold: int) -> None:
    """Set up a process of a pool that runs one task at a time: heap thresholds, one BLAS thread, no SIGINT.

    One BLAS thread: idle OpenBLAS threads spin on the cores the other
    workers need.  SIGINT is ignored: a Ctrl-C reaches the whole process
    group, and the process that owns the pool decides what stops.
    """
    import signal

    from threadpoolctl import threadpool_limits

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_heap_thresholds(mmap_threshold, trim_threshold)
    threadpool_limits(1, "blas")
