"""Turn a ``[cluster]`` table into a dask scheduler for the duration of a run.

``[cluster]`` keys (all optional; without the table the threaded scheduler runs
with ``nproc`` workers)::

    type = "threads" | "local" | "address" | "slurm" | "pbs" | "sge" | "lsf" | "oar" | "htcondor"
    n_workers = 2            # local: worker processes (default nproc); jobqueue: a fixed job count
    threads_per_worker = 1   # local
    memory_limit = "4GiB"    # local: per worker; jobqueue: per job (default 4GiB)
    address = "tcp://host:8786"   # address: an existing scheduler
    no_worker_timeout = 300  # distributed: seconds without any worker before the run stops
    # jobqueue (batch jobs, each running dask workers):
    cores = 8                # cores per job
    queue = "batch"; account = "proj"
    walltime = "01:00:00"    # [D-]HH:MM:SS (HH:MM for lsf); workers retire before it
    minimum_jobs = 1; maximum_jobs = 4   # adaptive scaling between these (default 1 and 1)
    interface = "ib0"        # network interface of the scheduler and the workers
    log_directory = "logs"   # job logs (default: <output>/pystack3d_dask_report/worker_logs)
    job_script_prologue = ["module load python", "source env/bin/activate"]
    python = "/path/to/python"   # in the jobs (default: this interpreter)
    local_directory = "/tmp"     # workers' scratch space
    job_extra = {...}        # other keyword arguments of the dask-jobqueue class, checked

Batch jobs end (walltime, ``scancel``, a node failure): the jobs are scaled
adaptively, a job that ends is replaced, and each worker retires gracefully
(``--lifetime``) a little before its job's walltime.  When no worker is
available for ``no_worker_timeout`` seconds the run stops with
:class:`~pystack3d_dask.errors.WorkersLost`, keeping every chunk written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import math
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import dask

from pystack3d_dask.config import build_params, check, fail, suggest
from pystack3d_dask.errors import ConfigError, WorkersLost
from pystack3d_dask.process_settings import MMAP_THRESHOLD, bound_heap_growth
from pystack3d_dask.processes import kernel_pool
from pystack3d_dask.signals import keep_handlers, stop_run

log = logging.getLogger("pystack3d_dask")

ClusterType = Literal["threads", "local", "address", "slurm", "pbs", "sge", "lsf", "oar", "htcondor"]
CLUSTER_TYPES: tuple[str, ...] = ClusterType.__args__
_JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster",
             "oar": "OARCluster", "htcondor": "HTCondorCluster"}
#: our keys that are dask-jobqueue arguments of another name
_RENAMED = {"memory_limit": "memory"}
#: dask-jobqueue arguments that the run sets itself
_MANAGED = {"n_workers", "loop", "asynchronous", "job_cls", "scheduler", "name", "config_name", "job_kwargs",
            "base_class_kwargs", "dashboard_address"}
#: the dashboard of the scheduler a run starts: a free port, so that runs side by side never clash
DASHBOARD = ":0"
#: where job logs go by default, inside the project's report folder
LOG_FOLDER = "worker_logs"
#: seconds the workers get to silence their logs before the cluster's teardown
TEARDOWN_TIMEOUT = 10
#: dask config key: total worker threads a run may get (the write window is sized on it)
PLANNED_THREADS = "pystack3d_dask.planned-threads"


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    #: which scheduler runs the graphs
    type: ClusterType = "threads"
    #: worker processes (local, default nproc) or a fixed number of jobs (jobqueue)
    n_workers: int | None = None
    #: threads in each local worker process
    threads_per_worker: int = 1
    #: memory per local worker or per job, e.g. "4GiB"
    memory_limit: str | None = None
    #: scheduler address for type = "address"
    address: str | None = None
    #: seconds without any worker after which a distributed run stops (keeping what is written)
    no_worker_timeout: float = 300.0
    #: cores per job (jobqueue)
    cores: int = 1
    queue: str | None = None
    account: str | None = None
    #: time limit of each job: [D-]HH:MM:SS (HH:MM for lsf)
    walltime: str | None = None
    #: adaptive scaling between these job counts (jobqueue)
    minimum_jobs: int | None = None
    maximum_jobs: int | None = None
    #: network interface of the scheduler and the workers, e.g. "ib0"
    interface: str | None = None
    #: folder of the job scripts' logs (relative: to the output folder)
    log_directory: str | None = None
    #: shell lines run in each job before the worker starts (module load, source env/bin/activate)
    job_script_prologue: tuple[str, ...] = ()
    #: Python interpreter in the jobs (default: the one running the driver)
    python: str | None = None
    #: workers' scratch folder (spilled data)
    local_directory: str | None = None
    #: other keyword arguments of the dask-jobqueue class (checked against its signature)
    job_extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        check(self.n_workers is None or self.n_workers >= 1, "cluster", "n_workers", self.n_workers,
              "expected an integer >= 1")
        check(self.threads_per_worker >= 1, "cluster", "threads_per_worker", self.threads_per_worker,
              "expected an integer >= 1")
        check(self.cores >= 1, "cluster", "cores", self.cores, "expected an integer >= 1")
        check(self.type != "address" or bool(self.address), "cluster", "address", self.address,
              'type = "address" needs the scheduler address, e.g. "tcp://host:8786"')
        check(math.isfinite(self.no_worker_timeout) and self.no_worker_timeout > 0, "cluster",
              "no_worker_timeout", self.no_worker_timeout, "expected a number of seconds > 0")
        for key in ("minimum_jobs", "maximum_jobs"):
            value = getattr(self, key)
            check(value is None or value >= 1, "cluster", key, value, "expected an integer >= 1")
        if self.minimum_jobs is not None and self.maximum_jobs is not None:
            check(self.maximum_jobs >= self.minimum_jobs, "cluster", "maximum_jobs", self.maximum_jobs,
                  f"expected >= minimum_jobs ({self.minimum_jobs})")
        if self.n_workers is not None and self.type in _JOBQUEUE:
            check(self.minimum_jobs is None and self.maximum_jobs is None, "cluster", "n_workers",
                  self.n_workers, "give either n_workers (a fixed job count) or minimum_jobs/maximum_jobs")
        if self.walltime is not None:
            walltime_seconds(self.walltime, self.type)
        if self.type in _JOBQUEUE:
            _check_job_extra(self.type, self.job_extra)
        else:
            for f in dataclasses.fields(self):
                value = getattr(self, f.name)
                default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                check(f.name not in _JOBQUEUE_KEYS or value == default, "cluster", f.name, value,
                      f'only for a batch system (type = one of {", ".join(_JOBQUEUE)}), not type = "{self.type}"')

    @property
    def job_range(self) -> tuple[int, int]:
        """Minimum and maximum job counts of a jobqueue cluster."""
        if self.n_workers is not None:
            return self.n_workers, self.n_workers
        low = self.minimum_jobs or 1
        return low, max(low, self.maximum_jobs or low)


_JOBQUEUE_KEYS = {"cores", "queue", "account", "walltime", "minimum_jobs", "maximum_jobs", "interface",
                  "log_directory", "job_script_prologue", "python", "local_directory", "job_extra"}


def default_client():
    """The default ``distributed`` client, or None (then dask's local schedulers run the graph).

    A client exists only once ``distributed`` is imported: this never imports
    it, which would cost every local run about half a second.
    """
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client as client

    try:
        return client()
    except ValueError:
        return None


def cluster_config(value: ClusterConfig | Mapping | str, table: ClusterConfig | None = None) -> ClusterConfig:
    """The cluster of a run from an API or command-line value.

    ``value`` is a :class:`ClusterConfig`, a mapping of ``[cluster]`` keys, a
    cluster type (``"local"``, ``"slurm"``...: the ``[cluster]`` ``table``
    when it is of that type, else that type's defaults) or a scheduler address.
    """
    if isinstance(value, ClusterConfig):
        return value
    if isinstance(value, str):
        if value in CLUSTER_TYPES:
            if table is not None and table.type == value:
                return table
            value = {"type": value}
        elif re.fullmatch(r"(\w+://)?[\w.\-\[\]:]+:\d+", value):
            value = {"type": "address", "address": value}
        else:
            raise ConfigError(f"cluster = {value!r} is invalid: expected one of {', '.join(CLUSTER_TYPES)}"
                              f"{suggest(value, CLUSTER_TYPES)} or a scheduler address like tcp://host:8786.")
    return build_params(ClusterConfig, value, section="cluster")


def walltime_seconds(walltime: str, cluster_type: str = "slurm") -> int:
    """Seconds of a walltime: ``[D-]HH:MM:SS``, or ``HH:MM`` for LSF (its own format)."""
    pattern = r"(\d+):(\d{2})" if cluster_type == "lsf" else r"(?:(\d+)-)?(\d+):(\d{2}):(\d{2})"
    match = re.fullmatch(pattern, walltime.strip()) if isinstance(walltime, str) else None
    if match is None:
        fail("cluster", "walltime", walltime, "expected HH:MM" if cluster_type == "lsf" else
             "expected [D-]HH:MM:SS, e.g. 02:00:00")
    if cluster_type == "lsf":
        hours, minutes = map(int, match.groups())
        return hours * 3600 + minutes * 60
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def lifetime_args(walltime: str, cluster_type: str) -> list[str]:
    """Worker arguments that retire each worker gracefully before its job's walltime.

    The worker leaves between ``walltime - 1.5 m`` and ``walltime - 0.5 m``,
    with ``m`` 10 % of the walltime, at least 15 s and at most 5 minutes
    (dask-jobqueue's documented pattern: ``--lifetime`` shorter than the
    walltime, staggered so that the workers do not all leave at once).  The
    lifetime counts from the worker's start, seconds after the job's on a busy
    node: the 15 s keep a short job's worker from outliving it.
    """
    total = walltime_seconds(walltime, cluster_type)
    margin = min(max(0.1 * total, 15.0), 300.0, total / 4)
    return ["--lifetime", f"{int(total - margin)}s", "--lifetime-stagger", f"{int(margin / 2)}s"]


def _jobqueue_class(cluster_type: str):
    try:
        # its runner module sets SIGINT's handler to sys.exit at import
        with keep_handlers(signal.SIGINT):
            import dask_jobqueue
    except ImportError:
        raise ConfigError(
            f'[cluster] type = "{cluster_type}" needs dask-jobqueue: pip install "pystack3d-dask[hpc]".'
        ) from None
    return getattr(dask_jobqueue, _JOBQUEUE[cluster_type])


def _jobqueue_arguments(cluster_type: str) -> set[str]:
    """Keyword arguments of the dask-jobqueue class of ``cluster_type`` and of its job class."""
    from dask_jobqueue.core import Job, JobQueueCluster

    cls = _jobqueue_class(cluster_type)
    names = set()
    # the cluster class passes what it does not know to its job class; SpecCluster's own are set for it
    classes = [k for k in cls.__mro__ if issubclass(k, JobQueueCluster)]
    classes += [k for k in cls.job_cls.__mro__ if issubclass(k, Job)]
    for klass in classes:
        if "__init__" in vars(klass):
            names |= {p.name for p in inspect.signature(klass.__init__).parameters.values()
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
    return names - _MANAGED


def _check_job_extra(cluster_type: str, job_extra: Mapping[str, Any]) -> None:
    allowed = _jobqueue_arguments(cluster_type)
    ours = {_RENAMED.get(f.name, f.name): f.name for f in dataclasses.fields(ClusterConfig)}
    for key in job_extra:
        if key in ours:
            raise ConfigError(f"[cluster] job_extra key {key!r}: set it as [cluster] {ours[key]} instead.")
        if key not in allowed:
            raise ConfigError(f"[cluster] job_extra key {key!r} is unknown to dask-jobqueue's "
                              f"{_JOBQUEUE[cluster_type]}{suggest(key, allowed)}; allowed keys: "
                              f"{', '.join(sorted(allowed - set(ours)))}.")


def _jobqueue_cluster(cfg: ClusterConfig, log_directory: Path):
    # the driver's dask config does not reach the jobs: their nannies get the workers' environment here
    environ = {k: str(v) for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()}
    prologue = [f"export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON={shlex.quote(json.dumps(environ))}",
                *cfg.job_script_prologue]
    kwargs: dict[str, Any] = dict(
        cores=cfg.cores, memory=cfg.memory_limit or "4GiB", queue=cfg.queue, account=cfg.account,
        walltime=cfg.walltime, interface=cfg.interface, python=cfg.python,
        local_directory=cfg.local_directory, job_script_prologue=prologue,
        log_directory=str(log_directory / (cfg.log_directory or LOG_FOLDER)),
    )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.update(cfg.job_extra)
    kwargs["scheduler_options"] = {"dashboard_address": DASHBOARD, **kwargs.get("scheduler_options", {})}
    extra_args = list(kwargs.get("worker_extra_args") or [])
    if cfg.walltime is not None and "--lifetime" not in extra_args:
        kwargs["worker_extra_args"] = extra_args + lifetime_args(cfg.walltime, cfg.type)
    Path(kwargs["log_directory"]).mkdir(parents=True, exist_ok=True)
    cluster = _jobqueue_class(cfg.type)(**kwargs)
    low, high = cfg.job_range
    cluster.adapt(minimum_jobs=low, maximum_jobs=high, Adaptive=_replacing_adaptive())
    log.info("%s: %d to %d jobs of %d cores, %s, walltime %s; job logs in %s", cfg.type, low, high, cfg.cores,
             kwargs["memory"], cfg.walltime or "the queue's default", kwargs["log_directory"])
    return cluster


@functools.cache
def _replacing_adaptive() -> type:
    """distributed's ``Adaptive``, made to replace the jobs that end (imported on first use)."""
    from distributed.deploy import Adaptive

    class ReplacingAdaptive(Adaptive):
        """Adaptive scaling that replaces the jobs that ended (walltime, ``scancel``, lifetime).

        distributed forgets a lost job's process but keeps it in the cluster's
        plan, so the adaptive target is met on paper and the job is never
        replaced (dask-jobqueue issues #611, #691): drop it from the plan.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._seen: set = set()

        async def recommendations(self, target: int) -> dict:
            cluster = self.cluster
            self._seen |= set(cluster.workers)
            # a job seen running, gone from the cluster's jobs: job names are never reused
            for name in (self._seen & set(cluster.worker_spec)) - set(cluster.workers):
                log.info("worker job %s ended: replacing it", name)
                del cluster.worker_spec[name]
                self._seen.discard(name)
            return await super().recommendations(target)

    return ReplacingAdaptive


class _Watchdog(threading.Thread):
    """Stops the run when the client has had no worker for ``timeout`` seconds."""

    def __init__(self, client, timeout: float, what: str):
        super().__init__(daemon=True, name="pystack3d-dask-watchdog")
        self._client, self._timeout, self._what = client, timeout, what
        self._done = threading.Event()

    def run(self) -> None:
        idle_since = time.monotonic()
        while not self._done.wait(1.0):
            try:
                workers = len(self._client.nthreads())
            except Exception:  # the client is closing
                return
            if workers:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self._timeout:
                stop_run(WorkersLost(self._what, self._timeout))
                return

    def stop(self) -> None:
        self._done.set()


def _worker_malloc_env() -> None:
    # The nanny sets MALLOC_TRIM_THRESHOLD_=65536 in workers, which makes FFT-heavy code
    # twice slower (PITFALLS): the thresholds of this process instead (local workers read
    # this config; batch jobs get it in their script, where a key can be changed, not removed).
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    env["MALLOC_TRIM_THRESHOLD_"] = env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    dask.config.set({"distributed.nanny.pre-spawn-environ": env})


def _silence_distributed() -> None:
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


def _quiet_teardown(client) -> None:
    """Silence distributed's logs, here and on the workers, for the cluster's teardown.

    Workers closed one by one log the heartbeats and data transfers that the
    teardown breaks, with tracebacks, after a clean or an interrupted run alike:
    the run's outcome is settled by then, and its own message must be the last
    line.
    """
    _silence_distributed()
    with contextlib.suppress(Exception):  # workers already gone (walltime) or unreachable
        client.run(_silence_distributed, on_error="ignore", callback_timeout=TEARDOWN_TIMEOUT)


@contextlib.contextmanager
def scheduler(cfg: ClusterConfig | None, *, nproc: int = 1, folder: str | Path = ".") -> Iterator[bool]:
    """Run the enclosed computations on the configured scheduler.

    Yields True when a ``distributed`` client is active (tasks run in worker
    processes), False for the threaded scheduler.  ``folder`` is the output
    folder: job logs go under ``folder/pystack3d_dask_report`` by default.
    Every cluster started here is closed on the way out (its batch jobs
    cancelled), whatever the way out.
    """
    cfg = cfg or ClusterConfig()
    bound_heap_growth()
    if cfg.type == "threads":
        from threadpoolctl import threadpool_limits

        # One BLAS thread per task: dask already runs nproc tasks at once, and BLAS threads on
        # top of them oversubscribe the cores (a per-slice least-squares fit ran 20x slower).
        # The kernels that hold the GIL run in nproc processes (processes.py).
        with (dask.config.set(scheduler="threads", num_workers=nproc), threadpool_limits(limits=1, user_api="blas"),
              kernel_pool(nproc)):
            yield False
        return
    from distributed import Client, LocalCluster

    _worker_malloc_env()
    with contextlib.ExitStack() as stack:
        distributed_log = logging.getLogger("distributed")
        stack.callback(distributed_log.setLevel, distributed_log.level)  # runs last: after the teardown
        planned = 0
        if cfg.type == "address":
            client = stack.enter_context(Client(cfg.address))
        else:
            if cfg.type == "local":
                n = cfg.n_workers or nproc
                cluster = LocalCluster(n_workers=n, threads_per_worker=cfg.threads_per_worker,
                                       memory_limit=cfg.memory_limit or "auto", processes=True,
                                       dashboard_address=DASHBOARD)
                planned = n * cfg.threads_per_worker
            else:
                from pystack3d_dask.report import REPORT_DIR

                cluster = _jobqueue_cluster(cfg, Path(folder) / REPORT_DIR)
                planned = cfg.job_range[1] * cfg.cores
            stack.enter_context(cluster)
            client = stack.enter_context(Client(cluster))
        if cfg.type != "address":  # a shared scheduler's workers outlive the run: their logs are theirs
            stack.callback(_quiet_teardown, client)
        watchdog = _Watchdog(client, cfg.no_worker_timeout,
                             "all worker jobs ended" if cfg.type in _JOBQUEUE else "no worker left")
        watchdog.start()
        stack.callback(watchdog.stop)
        stack.enter_context(dask.config.set({"scheduler": client, PLANNED_THREADS: planned}))
        yield True
