"""Task overhead: the whole chain on many small slices, time per slice at N and at 10 N slices.

    python benchmarks/bench_task_overhead.py [--slices 1000,10000] [--side 64] [--chunk-slices N]

The lead's idle rerun: ``python benchmarks/bench_task_overhead.py --slices 1000,10000``
(under 10 min on 2 cores: writing the stacks ~2 min, the runs took 1 and 6.5 min on the loaded
machine; measured there: 0.72 wall, 0.81 CPU per slice at 10 000 / 1 000 slices).

For each slice count, the demo's synthetic project (:mod:`pystack3d_dask.demo`: PyStack3D's
Figure 1 kind, ``side`` x ``side`` px plus its empty border, every other slice deleted from a
third of the stack on, so the input holds about 2/3 of the slices asked) is written, then run end
to end by a fresh ``Project(...).run()`` process: discovery, ingest, the eight steps, the report
page.  ``--chunk-slices`` cuts the stack into chunks of that many slices instead of the default
32 MiB (one or two chunks at 64 px): many chunks stress the per-chunk costs of big slices.

Printed per slice count, all measured in the child process:

* wall and CPU time per input slice (CPU: user + system of the driver and its reaped
  children, the registration pool; the steadier figure on a shared machine), and what is
  left outside the steps (discovery, the report page);
* the driver's peak RSS (``ru_maxrss``): with the threaded scheduler the scheduler runs in
  the driver, so this holds every graph and the scheduler's state;
* per step: seconds, tasks in the graph the write pass computes (the merged graph of its
  write tasks, counted outside the timed part), the graph build time (from the step's
  ``apply`` to the write pass starting: the graph, its optimisation, the write tasks), and
  the state's seconds when computed.

Then the ratios last / first per input slice (target <= 1.25 for 10x the slices).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import run_python  # noqa: E402

CHILD = r"""
import dataclasses, json, resource, sys, time
from dask.highlevelgraph import HighLevelGraph
from pystack3d_dask import engine

toml, chunk_slices = sys.argv[1], (int(sys.argv[2]) or None)
steps, clock = {}, {}
real_execute, real_get_step = engine.execute, engine.get_step


def get_step(name):
    step = real_get_step(name)

    def state(*args, **kwargs):
        start = time.perf_counter()
        try:
            return step.compute_state(*args, **kwargs)
        finally:
            steps.setdefault(name, {})["state_s"] = time.perf_counter() - start

    def apply(*args, **kwargs):
        clock[name] = time.perf_counter()
        return step.apply(*args, **kwargs)

    return dataclasses.replace(step, apply=apply, compute_state=state if step.compute_state else None)


def execute(tasks, *, desc, **kwargs):
    entry = time.perf_counter()
    desc = "input" if desc == "ingest" else desc
    row = steps.setdefault(desc, {})
    if desc in clock:
        row["build_s"] = entry - clock.pop(desc)
    row["tasks"] = len(HighLevelGraph.merge(*(t.__dask_graph__() for t in tasks)).to_dict()) if tasks else 0
    row["counting_s"] = time.perf_counter() - entry  # taken out of the step's time
    return real_execute(tasks, desc=desc, **kwargs)


engine.get_step, engine.execute = get_step, execute
start = time.perf_counter()
report = engine.Project(toml, quiet=True, chunk_slices=chunk_slices).run()
wall = time.perf_counter() - start
self, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
counting = sum(r.get("counting_s", 0.0) for r in steps.values())
for name, seconds in report.seconds.items():
    steps.setdefault(name, {})["seconds"] = seconds - steps.get(name, {}).get("counting_s", 0.0)
print(json.dumps({"wall_s": wall - counting, "cpu_s": self.ru_utime + self.ru_stime + children.ru_utime
                  + children.ru_stime - counting, "driver_peak_mib": self.ru_maxrss / 1024,
                  "steps": steps}))
"""


def run_size(workdir: Path, nslices: int, side: int, chunk_slices: int | None) -> dict:
    from pystack3d_dask.demo import write_demo_project
    from pystack3d_dask.report import REPORT_DIR
    from pystack3d_dask.store import STORE_NAME
    from pystack3d_dask.synthetic import SyntheticCase

    start = time.perf_counter()
    toml = workdir / "stack" / "params.toml"
    if toml.exists():  # a stack kept by --workdir: the same files, a fresh store
        spec = SyntheticCase((nslices, side, side))
        shutil.rmtree(toml.parent / STORE_NAME, ignore_errors=True)
        shutil.rmtree(toml.parent / REPORT_DIR, ignore_errors=True)
    else:
        toml, spec = write_demo_project(workdir, shape=(nslices, side, side), truth=False)
    written = time.perf_counter() - start
    _, _, out = run_python(CHILD, str(toml), str(chunk_slices or 0))
    result = json.loads(out.strip().splitlines()[-1])
    result.update(slices=len(spec.kept), shape=[len(spec.kept)] + [side + 2 * spec.border] * 2, write_s=written)
    return result


def _print(r: dict) -> None:
    n = r["slices"]
    inside = sum(s.get("seconds", 0.0) for s in r["steps"].values())
    print(f"{n} slices of {r['shape'][1]}x{r['shape'][2]}: {1e3 * r['wall_s'] / n:.2f} ms wall, "
          f"{1e3 * r['cpu_s'] / n:.2f} ms CPU per slice; outside the steps (discovery, report) "
          f"{r['wall_s'] - inside:.1f} s; driver peak RSS {r['driver_peak_mib']:.0f} MiB "
          f"(stack written in {r['write_s']:.0f} s)", flush=True)
    print(f"    {'step':<28}{'seconds':>9}{'ms/slice':>10}{'state s':>9}{'tasks':>8}{'build s':>9}")
    for name, s in r["steps"].items():
        state = f"{s['state_s']:9.2f}" if "state_s" in s else f"{'-':>9}"
        build = f"{s['build_s']:9.2f}" if "build_s" in s else f"{'-':>9}"
        print(f"    {name:<28}{s.get('seconds', 0.0):9.2f}{1e3 * s.get('seconds', 0.0) / n:10.2f}{state}"
              f"{s.get('tasks', 0):8d}{build}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", default="1000,10000", help="comma-separated slice counts (before the "
                        "synthetic case deletes a third of them)")
    parser.add_argument("--side", type=int, default=64, help="slice side in px, before the border")
    parser.add_argument("--chunk-slices", type=int, help="slices per chunk (default: chunks of 32 MiB)")
    parser.add_argument("--workdir", help="where to write the stacks, kept for the next run (default: a "
                        "temporary folder, removed)")
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.slices.split(",")]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="pystack3d_overhead_"))
    results = []
    try:
        for n in sizes:
            results.append(run_size(root / f"n{n}", n, args.side, args.chunk_slices))
            _print(results[-1])
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    first = results[0]
    for r in results[1:]:
        k = r["slices"] / first["slices"]
        print(f"{r['slices']} / {first['slices']} slices, per slice: wall {r['wall_s'] / first['wall_s'] / k:.3f}, "
              f"CPU {r['cpu_s'] / first['cpu_s'] / k:.3f} (target <= 1.25); driver peak RSS "
              f"{r['driver_peak_mib'] / first['driver_peak_mib']:.2f}x")
        for name, s in r["steps"].items():
            a = first["steps"].get(name, {})
            if a.get("seconds") and s.get("seconds"):
                print(f"    {name:<28} per slice {s['seconds'] / a['seconds'] / k:6.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
