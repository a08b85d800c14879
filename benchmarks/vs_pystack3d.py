"""The whole chain, PyStack3D vs pystack3d-dask, on the same synthetic stack and parameter file.

    python benchmarks/vs_pystack3d.py --pystack3d-python /path/to/venv/bin/python [--shape 100,1024,1024]

PyStack3D (GPL-3) is never imported here: it runs in the interpreter given,
in which ``pip install pystack3d`` was done (a separate venv keeps its
dependencies apart).  Both tools get the same TIFF files and the same
``params.toml`` (``configs/pystack3d_params.toml`` without
``intensity_rescaling_area``, which PyStack3D cannot run), with ``nproc`` the
machine's cores.  Printed: each tool's wall time, their ratio, and ours per step.
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

PYSTACK3D = """
import sys
from pystack3d import Stack3d
Stack3d(input_name=sys.argv[1]).eval(nproc=int(sys.argv[2]), show_pbar=False)
"""

OURS = """
import json, sys
from pystack3d_dask.engine import Project
print(json.dumps(Project(sys.argv[1], quiet=True).run().seconds))
"""


def params_text(nproc: int) -> str:
    text = CONFIG.read_text().replace('    "intensity_rescaling_area",\n', "")
    return text.replace("nproc = 1", f"nproc = {nproc}")


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - start, out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pystack3d-python", required=True, help="a Python where pystack3d is installed")
    parser.add_argument("--shape", default="100,1024,1024", help="N,H,W of the synthetic stack")
    args = parser.parse_args(argv)
    from pystack3d_dask.synthetic import SyntheticCase

    shape = tuple(int(v) for v in args.shape.split(","))
    nproc = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="vs_pystack3d_"))
    try:
        spec = SyntheticCase(shape, defects=("shifts", "contrast", "background", "curtains"))
        folders = [root / "pystack3d", root / "ours"]
        for folder in folders:
            folder.mkdir()
            (folder / "params.toml").write_text(params_text(nproc))
        import tifffile

        for name, img in spec.iter_slices():
            for folder in folders:
                tifffile.imwrite(folder / name, img)
        os.sync()
        # PyStack3D takes the folder (its Stack3d fails when given the .toml path)
        t_ref, _ = timed([args.pystack3d_python, "-c", PYSTACK3D, str(folders[0]), str(nproc)])
        t_ours, out = timed([sys.executable, "-c", OURS, str(folders[1] / "params.toml")])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{shape[0]} x {shape[1]} x {shape[2]} uint8, nproc = {nproc}, same files and params.toml")
    print(f"PyStack3D       {t_ref:8.1f} s")
    print(f"pystack3d-dask  {t_ours:8.1f} s   x{t_ref / t_ours:.2f} faster")
    for step, seconds in json.loads(out.strip().splitlines()[-1]).items():
        print(f"    {step:<28} {seconds:7.1f} s")


if __name__ == "__main__":
    main()
