"""The report's cost: a whole run with the report page vs the same run with ``--no-plots``.

Runs ``pystack3d-dask run`` on the demo's synthetic project (fresh store each
time, a fresh interpreter each run, the two kinds alternated so the machine's
drift hits both alike), then ``pystack3d-dask report`` on the finished project:
drawing every figure at once, on the critical path, bounds what the background
thread does during a run.  Prints ratios of wall time and of CPU time (user +
system of the whole process tree, less sensitive than wall time to the other
jobs of a shared machine).

    python benchmarks/bench_report.py [--shape 120,256,256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import run_python

from pystack3d_dask.cli import _shape
from pystack3d_dask.demo import write_demo_project
from pystack3d_dask.report.writer import REPORT_DIR, SECTIONS_DIR

CLI = "import sys; from pystack3d_dask.cli import main; sys.exit(main(sys.argv[1:]))"


def timed(*args: str) -> tuple[float, float]:
    """Wall and CPU seconds of ``pystack3d-dask ARGS`` in a fresh interpreter (its children included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds, _, _ = run_python(CLI, *args)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=_shape, default=(120, 256, 256), help="N,H,W of the demo's ground truth")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        toml, _ = write_demo_project(tmp, shape=args.shape)
        folder = toml.parent
        times: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for i in range(args.repeat):
            for plots in ((False, True) if i % 2 == 0 else (True, False)):
                shutil.rmtree(folder / "pystack3d_dask.zarr", ignore_errors=True)
                shutil.rmtree(folder / REPORT_DIR, ignore_errors=True)
                seconds, cpu_seconds = timed("-q", "run", str(toml), *(() if plots else ("--no-plots",)))
                times[plots].append(seconds)
                cpu[plots].append(cpu_seconds)
                print(f"run {i + 1} {'with the report' if plots else '--no-plots     '}: {seconds:6.1f} s, "
                      f"CPU {cpu_seconds:6.1f} s", flush=True)
        page = folder / REPORT_DIR / "index.html"
        # else the report reuses the run's sections (none when the last run had --no-plots)
        shutil.rmtree(folder / REPORT_DIR / SECTIONS_DIR, ignore_errors=True)
        report_seconds, report_cpu = timed("-q", "report", str(toml))
        size = page.stat().st_size
    best = min(times[True]) / min(times[False])
    median = statistics.median(times[True]) / statistics.median(times[False])
    cpu_ratio = statistics.median(cpu[True]) / statistics.median(cpu[False])
    print(f"\nstack {args.shape}: run with the report / run with --no-plots = {best:.3f} wall (best of "
          f"{args.repeat}), {median:.3f} wall (median), {cpu_ratio:.3f} CPU (median)")
    print(f"the whole report drawn at once (pystack3d-dask report, a fresh interpreter): "
          f"{report_seconds / min(times[False]):.3f} of the run's wall time, "
          f"{report_cpu / statistics.median(cpu[False]):.3f} of its CPU time; page {size / 1024:.0f} kB")


if __name__ == "__main__":
    sys.exit(main())
