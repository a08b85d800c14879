"""Benchmark runner: times each step of a project and the peak memory of the whole process tree.

    python benchmarks/run.py [--shape 100,1024,1024] [--steps cropping,...] [--scales 1,4]

For every scale s, a synthetic stack of ``s * N`` slices is written, then run
by a fresh ``pystack3d-dask`` process whose process tree's resident memory is
sampled.  Printed, all measured in this one run:

* ingest throughput / a plain ``tifffile.imread`` of the same files (target >= 0.5), both
  from the page cache (default) or both from the disk (``--cold``), over
  the whole stack and over the extra slices between two scales (fixed start-up costs cancel);
* each step's throughput / a plain read of its input from the same store;
* peak memory at each scale / peak memory at the first (target <= 1.2 at 4x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import mib, plain_store_read, plain_tiff_read, run_python  # noqa: E402

CHILD = """
import json, sys
from pystack3d_dask.engine import Project
report = Project(sys.argv[1], quiet=True).run()
print(json.dumps(report.seconds))
"""


def drop_page_cache() -> None:
    """Empty the OS page cache (Linux, root only) so the next read comes from the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"--cold needs root on Linux to drop the page cache: {exc}") from None


def bench_scale(workdir: Path, shape: tuple[int, int, int], steps: list[str], *, cold: bool = False) -> dict:
    from pystack3d_dask.demo import write_demo_project
    from pystack3d_dask.store import STORE_NAME

    toml, spec = write_demo_project(workdir, shape=shape, steps=steps)
    files = sorted(toml.parent.glob("*.tif"))
    nbytes = sum(f.stat().st_size for f in files)
    os.sync()  # the files just written must not be flushed to disk during the timed run
    if cold:  # both read from the disk, as a user's first run does
        drop_page_cache()
        plain = plain_tiff_read(files)
        drop_page_cache()
    else:  # both read from the page cache
        plain = min(plain_tiff_read(files) for _ in range(2))
    seconds, peak, out = run_python(CHILD, str(toml))
    times = json.loads(out.strip().splitlines()[-1])
    store = toml.parent / STORE_NAME
    result = {"slices": len(files), "input_mib": mib(nbytes), "peak_mib": mib(peak), "wall_s": seconds,
              "ingest_s": times["input"], "plain_read_s": plain, "ingest_ratio": plain / times["input"], "steps": {}}
    prev = "input"
    for step in steps:
        if step not in times:
            continue
        base = plain_store_read(store, f"{prev}/_")
        result["steps"][step] = {"seconds": times[step], "ratio_vs_plain_read": base / times[step]}
        if (store / step / "_").exists():
            prev = step
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="100,1024,1024", help="N,H,W of the ground truth at scale 1")
    parser.add_argument("--steps", default="cropping", help="comma-separated steps to time")
    parser.add_argument("--scales", default="1,4", help="comma-separated multiples of N")
    parser.add_argument("--workdir", help="where to write the stacks (default: a temporary folder)")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before the plain read and the run (root, Linux)")
    args = parser.parse_args(argv)
    n, h, w = (int(v) for v in args.shape.split(","))
    steps = [s for s in args.steps.split(",") if s]
    scales = [int(s) for s in args.scales.split(",")]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="pystack3d_bench_"))
    results = {}
    try:
        for s in scales:
            results[s] = bench_scale(root / f"x{s}", (n * s, h, w), steps, cold=args.cold)
            r = results[s]
            print(f"scale {s}x: {r['slices']} slices, {r['input_mib']:.0f} MiB, peak memory {r['peak_mib']:.0f} MiB, "
                  f"ingest {r['ingest_ratio']:.2f}x a plain tifffile read", flush=True)
            for step, t in r["steps"].items():
                print(f"    {step:<28} {t['seconds']:7.2f} s   {t['ratio_vs_plain_read']:.3f}x a plain store read")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    first = scales[0]
    for s in scales[1:]:
        a, b = results[first], results[s]
        # the extra slices alone: fixed costs (imports, store creation) cancel out
        marginal = (b["plain_read_s"] - a["plain_read_s"]) / (b["ingest_s"] - a["ingest_s"])
        print(f"ingest throughput on the extra slices from {first}x to {s}x: {marginal:.2f}x a plain tifffile read")
        print(f"peak memory at {s}x slices / at {first}x: {b['peak_mib'] / a['peak_mib']:.3f}")
    print(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
