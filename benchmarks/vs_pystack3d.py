"""The whole chain, PyStack3D vs pystack3d-dask, on the same synthetic stack and parameter file.

    python benchmarks/vs_pystack3d.py --pystack3d-python /path/to/venv/bin/python \
        [--shape 60,1024,1024 200,300,340]

PyStack3D (GPL-3) is never imported here: it runs in the interpreter given,
in which ``pip install pystack3d`` was done (a separate venv keeps its
dependencies apart).  Both tools get the same TIFF files and the same
``params.toml`` (``configs/pystack3d_params.toml`` without
``intensity_rescaling_area``, which PyStack3D cannot run), with ``nproc`` the
machine's cores.  Ours runs twice: with that file unchanged, and with our fast
options (:data:`FAST_OPTIONS`) added.

Printed per shape: each run's wall time and its ratio to PyStack3D, the time
per step (PyStack3D's from the time its step folders were last written), and
the distance of each final result to the ground truth (registration residual
and stripe power, see :mod:`pystack3d_dask.quality`), so that a speed-up never
hides a loss of accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = Path(__file__).parents[1] / "configs" / "pystack3d_params.toml"

#: keys added to the parameter file for the "fast" run (our own options, off by default).  Not
#: ``pad = true``: the fast solver's row transforms leave little FFT time to save (at 1024^2 it
#: pads nothing), and at 300 x 340 (to 350) its destriping took 1.3x the time, stripe power 1.286
#: vs 1.292, rmse 12.96 vs 12.83 (one run, 200 slices)
FAST_OPTIONS = {
    "registration_calculation": {"method": "phase_correlation"},
    "destriping": {"solver": "fast"},
}

PYSTACK3D = """
import sys
from pystack3d import Stack3d
Stack3d(input_name=sys.argv[1]).eval(nproc=int(sys.argv[2]), show_pbar=False)
"""

OURS = """
import json, sys, tomllib
from pathlib import Path
from pystack3d_dask.engine import Project
toml = Path(sys.argv[1])
table = tomllib.loads(toml.read_text())
for step, keys in json.loads(sys.argv[2]).items():
    table[step].update(keys)
table["project_dir"] = str(toml.parent)
print(json.dumps(Project(table, quiet=True).run().seconds))
"""


def params_text(nproc: int) -> str:
    text = CONFIG.read_text().replace('    "intensity_rescaling_area",\n', "")
    return text.replace("nproc = 1", f"nproc = {nproc}")


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - start, out


def pystack3d_steps(folder: Path, start: float) -> dict[str, float]:
    """Seconds per PyStack3D step, from the last write time in each of its step folders."""
    ends = {step.name: max(p.stat().st_mtime for p in step.rglob("*")) for step in (folder / "process").iterdir()}
    out, last = {}, start
    for name, end in sorted(ends.items(), key=lambda kv: kv[1]):
        out[name], last = end - last, end
    return out


def quality(folder: Path, spec) -> tuple[float, float, float]:
    """(max registration residual px, stripe power ratio, rmse) of a TIFF folder against the truth."""
    import dask.array as da
    import numpy as np
    import tifffile

    from pystack3d_dask.quality import compare
    from pystack3d_dask.synthetic import DZ

    files = sorted(folder.glob("*.tif"))
    first = tifffile.imread(files[0])
    stack = da.stack([da.from_delayed(_read(f), first.shape, first.dtype) for f in files]).rechunk((8, -1, -1))
    zpos = np.array([float(f.stem.split("z=")[1].removesuffix("um")) for f in files])
    q = compare(stack, zpos - zpos[0], spec.truth_slice, dz=DZ, ntruth=spec.shape[0])
    return q.max_shift_px, q.stripe_ratio, q.rmse


def _read(path: Path):
    import dask
    import tifffile

    return dask.delayed(tifffile.imread)(path)


def run_shape(shape: tuple[int, int, int], pystack3d_python: str, nproc: int) -> None:
    import tifffile

    from pystack3d_dask.engine import Project
    from pystack3d_dask.quality import compare
    from pystack3d_dask.synthetic import DZ, SyntheticCase

    root = Path(tempfile.mkdtemp(prefix="vs_pystack3d_"))
    try:
        spec = SyntheticCase(shape, defects=("shifts", "contrast", "background", "curtains"))
        runs = {"PyStack3D": root / "pystack3d", "ours": root / "ours", "ours, fast options": root / "fast"}
        for folder in runs.values():
            folder.mkdir()
            (folder / "params.toml").write_text(params_text(nproc))
        for name, img in spec.iter_slices():
            for folder in runs.values():
                tifffile.imwrite(folder / name, img)
        os.sync()
        wall, steps, acc = {}, {}, {}
        # PyStack3D takes the folder (its Stack3d fails when given the .toml path)
        start = time.time()
        wall["PyStack3D"], _ = timed([pystack3d_python, "-c", PYSTACK3D, str(runs["PyStack3D"]), str(nproc)])
        steps["PyStack3D"] = pystack3d_steps(runs["PyStack3D"], start)
        acc["PyStack3D"] = quality(runs["PyStack3D"] / "process" / "cropping_final", spec)
        for label, options in (("ours", {}), ("ours, fast options", FAST_OPTIONS)):
            toml = runs[label] / "params.toml"
            wall[label], out = timed([sys.executable, "-c", OURS, str(toml), json.dumps(options)])
            steps[label] = json.loads(out.strip().splitlines()[-1])
            project = Project(toml, quiet=True)
            q = compare(project.result("cropping_final"), project.zpos("cropping_final"), spec.truth_slice,
                        dz=DZ, ntruth=shape[0])
            acc[label] = (q.max_shift_px, q.stripe_ratio, q.rmse)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{shape[0]} x {shape[1]} x {shape[2]} uint8, nproc = {nproc}, same files and params.toml")
    print(f"{'':<20}{'wall s':>8}{'ratio':>8}{'shift px':>10}{'stripes':>9}{'rmse':>7}")
    for label, seconds in wall.items():
        shift, stripes, rmse = acc[label]
        print(f"{label:<20}{seconds:8.1f}{wall['PyStack3D'] / seconds:8.2f}{shift:10.2f}{stripes:9.2f}{rmse:7.2f}")
    print("seconds per step:")
    names = list(dict.fromkeys(n for s in steps.values() for n in s))
    print(f"    {'':<28}" + "".join(f"{label[:18]:>20}" for label in steps))
    for name in names:
        print(f"    {name:<28}" + "".join(f"{s.get(name, float('nan')):20.1f}" for s in steps.values()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pystack3d-python", required=True, help="a Python where pystack3d is installed")
    parser.add_argument("--shape", nargs="+", default=["60,1024,1024", "200,300,340"],
                        help="N,H,W of the synthetic stacks")
    args = parser.parse_args(argv)
    nproc = os.cpu_count() or 1
    for text in args.shape:
        run_shape(tuple(int(v) for v in text.split(",")), args.pystack3d_python, nproc)


if __name__ == "__main__":
    main()
