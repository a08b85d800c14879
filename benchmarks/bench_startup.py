"""Start-up of ``pystack3d-dask run`` on a complete project: what a run costs when there is nothing to compute.

    python benchmarks/bench_startup.py [--shape 40,128,128] [--repeat 5]

Makes the demo's synthetic project, runs it once, then times (best of
``--repeat``, a fresh interpreter each time):

- the whole command ``pystack3d-dask -q run PROJECT`` (report page included) and with ``--no-plots``;
- its parts in one interpreter: imports (CLI and engine), loading the configuration,
  the run itself (discovery, store checks: nothing to compute, no graph), the report page;
- the heaviest imports by ``python -X importtime``, and which heavy modules a run loads at all.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pystack3d_dask.cli import _shape
from pystack3d_dask.demo import write_demo_project

CLI = "import sys; from pystack3d_dask.cli import entry; sys.argv[0] = 'pystack3d-dask'; entry()"

PARTS = """
import sys, time
t0 = time.perf_counter()
import pystack3d_dask.cli
from pystack3d_dask.engine import Project
t1 = time.perf_counter()
project = Project(sys.argv[1], quiet=True)
t2 = time.perf_counter()
report = project.run(plots=False)
t3 = time.perf_counter()
from pystack3d_dask.report import ReportWriter
ReportWriter(project).finish(report)
t4 = time.perf_counter()
assert not report.done, report.done
heavy = [m for m in ("dask.array", "scipy.fft", "scipy.ndimage", "scipy.linalg", "scipy.sparse", "pywt",
                     "distributed", "zarr", "tifffile") if m in sys.modules]
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3, ",".join(heavy))
"""

#: packages whose import time is reported
PACKAGES = ("numpy", "dask", "dask.array", "zarr", "tifffile", "scipy", "pystack3d_dask.engine")


def seconds(*argv: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def import_times(toml: Path) -> dict[str, float]:
    """Cumulative import seconds of :data:`PACKAGES` during a run, by ``-X importtime``."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", CLI, "-q", "run", str(toml), "--no-plots"],
                         check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).stderr
    out = {}
    for line in err.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)$", line)
        if m and m.group(2) in PACKAGES:
            out[m.group(2)] = int(m.group(1)) / 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=_shape, default=(40, 128, 128), help="N,H,W of the demo's ground truth")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        toml, _ = write_demo_project(tmp, shape=args.shape)
        subprocess.run([sys.executable, "-c", CLI, "-q", "run", str(toml)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        whole = min(seconds("-c", CLI, "-q", "run", str(toml)) for _ in range(args.repeat))
        bare = min(seconds("-c", CLI, "-q", "run", str(toml), "--no-plots") for _ in range(args.repeat))
        parts = []
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, "-c", PARTS, str(toml)], check=True, capture_output=True,
                                 text=True).stdout.split()
            parts.append([float(v) for v in out[:4]] + [out[4] if len(out) > 4 else ""])
        best = [min(p[i] for p in parts) for i in range(4)]
        imports = import_times(toml)
    print(f"demo project {args.shape}, complete; best of {args.repeat}, a fresh interpreter each")
    print(f"pystack3d-dask run: {whole:.2f} s (with the report page), {bare:.2f} s (--no-plots)")
    print(f"parts: imports {best[0]:.2f} s, configuration {best[1]:.2f} s, run (discovery, store checks) "
          f"{best[2]:.2f} s, report page {best[3]:.2f} s")
    print("imports (cumulative, -X importtime): " + ", ".join(f"{k} {v:.2f} s" for k, v in imports.items()))
    print(f"heavy modules a run loads: {parts[0][4] or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
