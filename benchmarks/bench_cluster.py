"""The heavy steps on 1 vs 2 workers, on a LocalCluster and on Slurm jobs: speed-up ratios in one run.

Run, on an idle machine (about 2-3 minutes on 2 cores; the Slurm rows need a running Slurm,
started as root with ``bash .ci/start_slurm.sh``, and are left out without one)::

    python benchmarks/bench_cluster.py [--shape 64,512,512] [--no-slurm] [--queue debug] [--interface lo]

The demo's synthetic stack (``pystack3d-dask demo``) is ingested once, with three
steps: bkg_removal (3-D fit), registration_calculation and destriping (VSNR).
Then, for each scheduler in turn — a LocalCluster of 1 and of 2 worker
processes (one thread each), Slurm with 1 job and with 2 jobs of one core — the
cluster is started as a run starts it (:func:`pystack3d_dask.cluster.scheduler`:
same worker environment, job scripts and logs), its workers are awaited (their
start-up is not timed), and the three steps are recomputed on it
(``run(force=...)``, through its scheduler address).  Each step's seconds
(global state and write pass) come from the run's report.

Printed: seconds per step and scheduler, the speed-up of 2 workers over 1
(ideal 2.0 on two free cores) on each kind of cluster, and Slurm's time over
the LocalCluster's with the same workers (the cost of batch jobs).  Timings
vary by 10-15 % on a shared machine: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from distributed import get_client

from pystack3d_dask.cluster import ClusterConfig, scheduler
from pystack3d_dask.demo import write_demo_project
from pystack3d_dask.engine import Project

STEPS = ("bkg_removal", "registration_calculation", "destriping")
#: seconds to wait for the workers of a cluster (a Slurm job may wait in the queue)
WORKERS_TIMEOUT = 300


def slurm_running() -> bool:
    """Whether a Slurm controller answers here (``squeue`` works)."""
    if shutil.which("squeue") is None:
        return False
    return subprocess.run(["squeue", "-h"], capture_output=True).returncode == 0


def time_steps(toml: Path, cfg: ClusterConfig, n: int, folder: Path) -> dict[str, float]:
    """Seconds of each of :data:`STEPS`, recomputed on a cluster of ``n`` workers started from ``cfg``."""
    with scheduler(cfg, nproc=n, folder=folder):
        client = get_client()
        client.wait_for_workers(n, timeout=WORKERS_TIMEOUT)
        report = Project(toml, quiet=True, cluster=client.scheduler.address).run(force=[STEPS[0]], plots=False)
    return {name: report.seconds[name] for name in STEPS}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="64,512,512", help="N,H,W of the synthetic stack")
    parser.add_argument("--no-slurm", action="store_true", help="LocalCluster rows only")
    parser.add_argument("--queue", default=None, help="Slurm partition (default: the default partition)")
    parser.add_argument("--interface", default="lo", help="network interface of the scheduler and the jobs")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    clusters = {"local": lambda n: ClusterConfig(type="local", n_workers=n)}
    if not args.no_slurm and slurm_running():
        clusters["slurm"] = lambda n: ClusterConfig(type="slurm", n_workers=n, cores=1, memory_limit="2GiB",
                                                    interface=args.interface, queue=args.queue)
    elif not args.no_slurm:
        print("no Slurm answers here (start one as root: bash .ci/start_slurm.sh): Slurm rows left out")
    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as tmp:
        folder = Path(tmp)
        toml, _ = write_demo_project(folder / "stack", shape=shape, steps=STEPS)
        Project(toml, quiet=True, cluster="threads").run([], plots=False)  # ingest once, not timed
        seconds = {(kind, n): time_steps(toml, make(n), n, folder) for kind, make in clusters.items() for n in (1, 2)}
    print(f"{shape[0]} x {shape[1]} x {shape[2]} uint8; seconds per step (state and write pass), workers of one "
          "thread; speed-up = 1 worker / 2 workers")
    header = f"{'step':<26}" + "".join(f"{f'{kind} {n}w':>10}" for kind, n in seconds)
    header += "".join(f"{f'{kind} x2':>10}" for kind in clusters)
    if "slurm" in clusters:
        header += f"{'slurm/local 1w':>16}{'2w':>6}"
    print(header)
    for name in STEPS:
        row = f"{name:<26}" + "".join(f"{s[name]:10.2f}" for s in seconds.values())
        row += "".join(f"{seconds[kind, 1][name] / seconds[kind, 2][name]:10.2f}" for kind in clusters)
        if "slurm" in clusters:
            row += "".join(f"{seconds['slurm', n][name] / seconds['local', n][name]:{w}.2f}"
                           for n, w in ((1, 16), (2, 6)))
        print(row)


if __name__ == "__main__":
    main()
