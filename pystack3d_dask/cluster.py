"""Turn a ``[cluster]`` table into a dask scheduler for the duration of a run.

``[cluster]`` keys (all optional; without the table the threaded scheduler runs
with ``nproc`` workers)::

    type = "threads" | "local" | "address" | "slurm" | "pbs" | "sge" | "lsf" | "oar" | "htcondor"
    n_workers = 2            # local: worker processes; jobqueue: jobs to start
    threads_per_worker = 1   # local
    memory_limit = "4GiB"    # local: per worker; jobqueue: per job ("memory")
    address = "tcp://host:8786"   # address: an existing scheduler
    cores = 8                # jobqueue: cores per job
    queue = "batch"; account = "proj"; walltime = "01:00:00"   # jobqueue
    job_extra = {...}        # jobqueue: other dask-jobqueue keyword arguments, passed as is
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from collections.abc import Iterator
from typing import Literal

import dask

from pystack3d_dask.config import check
from pystack3d_dask.signals import keep_handlers

ClusterType = Literal["threads", "local", "address", "slurm", "pbs", "sge", "lsf", "oar", "htcondor"]
_JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster",
             "oar": "OARCluster", "htcondor": "HTCondorCluster"}


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    #: which scheduler runs the graphs
    type: ClusterType = "threads"
    #: worker processes (local) or jobs (jobqueue); default: nproc
    n_workers: int | None = None
    #: threads in each local worker process
    threads_per_worker: int = 1
    #: memory per local worker or per job, e.g. "4GiB"
    memory_limit: str | None = None
    #: scheduler address for type = "address"
    address: str | None = None
    #: cores per job (jobqueue)
    cores: int = 1
    queue: str | None = None
    account: str | None = None
    walltime: str | None = None
    #: extra dask-jobqueue keyword arguments, passed unchanged
    job_extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        check(self.n_workers is None or self.n_workers >= 1, "cluster", "n_workers", self.n_workers,
              "expected an integer >= 1")
        check(self.threads_per_worker >= 1, "cluster", "threads_per_worker", self.threads_per_worker,
              "expected an integer >= 1")
        check(self.cores >= 1, "cluster", "cores", self.cores, "expected an integer >= 1")
        check(self.type != "address" or bool(self.address), "cluster", "address", self.address,
              'type = "address" needs the scheduler address, e.g. "tcp://host:8786"')


#: allocations from this size up are mmapped and returned to the system when freed
MMAP_THRESHOLD = 16 * 2**20


def bound_heap_growth() -> None:
    """Fix glibc's mmap threshold in this process (no-op elsewhere than glibc).

    glibc raises its threshold to the size of each large block freed, up to
    32 MiB, so chunk-sized buffers then come from the heap, which fragments and
    keeps growing with the number of chunks processed (peak memory +50 % at 4x
    the slices).  A fixed 16 MiB threshold keeps slice-sized FFT buffers on the
    fast heap and gives chunk-sized ones back at once: peak memory no longer
    depends on the stack length.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _worker_malloc_env() -> None:
    # The nanny sets MALLOC_TRIM_THRESHOLD_=65536 in workers, which makes FFT-heavy code
    # twice slower (PITFALLS): drop it, and fix the mmap threshold as in this process.
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    dask.config.set({"distributed.nanny.pre-spawn-environ": env})


@contextlib.contextmanager
def scheduler(cfg: ClusterConfig | None, *, nproc: int = 1) -> Iterator[bool]:
    """Run the enclosed computations on the configured scheduler.

    Yields True when a ``distributed`` client is active (tasks run in worker
    processes), False for the threaded scheduler.
    """
    cfg = cfg or ClusterConfig()
    bound_heap_growth()
    if cfg.type == "threads":
        from threadpoolctl import threadpool_limits

        # One BLAS thread per task: dask already runs nproc tasks at once, and BLAS threads on
        # top of them oversubscribe the cores (a per-slice least-squares fit ran 20x slower).
        with dask.config.set(scheduler="threads", num_workers=nproc), threadpool_limits(limits=1, user_api="blas"):
            yield False
        return
    from distributed import Client, LocalCluster

    _worker_malloc_env()
    n = cfg.n_workers or nproc
    if cfg.type == "address":
        with Client(cfg.address) as client, dask.config.set(scheduler=client):
            yield True
        return
    if cfg.type == "local":
        cluster_cm = LocalCluster(n_workers=n, threads_per_worker=cfg.threads_per_worker,
                                  memory_limit=cfg.memory_limit or "auto", processes=True,
                                  dashboard_address=":0")
    else:
        try:
            # its runner module sets SIGINT's handler to sys.exit at import
            with keep_handlers(signal.SIGINT):
                import dask_jobqueue
        except ImportError:
            from pystack3d_dask.errors import ConfigError

            raise ConfigError(
                f'[cluster] type = "{cfg.type}" needs dask-jobqueue: pip install "pystack3d-dask[hpc]".'
            ) from None
        kwargs = dict(cores=cfg.cores, memory=cfg.memory_limit or "4GiB", queue=cfg.queue,
                      account=cfg.account, walltime=cfg.walltime, **cfg.job_extra)
        cluster_cm = getattr(dask_jobqueue, _JOBQUEUE[cfg.type])(
            **{k: v for k, v in kwargs.items() if v is not None})
        cluster_cm.scale(jobs=n)
    with cluster_cm as cluster, Client(cluster) as client, dask.config.set(scheduler=client):
        yield True
