"""``pystack3d-dask demo``: the whole chain on a synthetic stack with known defects.

Writes the defective stack and its ground truth as TIFF folders (streamed, one
slice at a time), a PyStack3D-style ``params.toml`` next to them, runs the
available steps one after the other and prints, after each, how far the result
is from the ground truth (see :mod:`pystack3d_dask.quality`).
"""

from __future__ import annotations

import os
from pathlib import Path

from pystack3d_dask.synthetic import DZ, POLICY, SyntheticCase, write_case

PARAMS = """\
# Demo parameters: the synthetic case of pystack3d_dask.synthetic (PyStack3D's Figure 1 kind).
channels = ["."]
nproc = {nproc}
process_steps = {steps}

[cropping]
area = [0, 99999, 0, 99999]

[bkg_removal]
dim = 3
orders = [1, 1, 1]
cross_terms = true
skip_factors = [4, 4, 4]
threshold_min = 1
weight_func = "HuberT"

[intensity_rescaling]
nbins = 256
range_bins = [1, 255]
filter_size = -1

[intensity_rescaling_area]
area = [{b}, {xb}, {b}, {yb}]
threshold_min = 1
factors_range = [0.5, 2.5]

[registration_calculation]
area = [{b}, {xb}, {b}, {yb}]
transformation = "TRANSLATION"

[registration_transformation]
mode = "edge"
subpixel = false   # the known shifts are whole pixels: drop the sub-pixel noise of each pair

[destriping]
maxit = 50
cvg_threshold = 1e-2
filters = [{{ name = "Gabor", noise_level = 20, sigma = [0.5, 80], theta = 0 }}]

[resampling]
policy = "{policy}"
dz = {dz}

[cropping_final]
area = [{b}, {xb}, {b}, {yb}]
"""

#: the order PyStack3D's synthetic example uses
DEMO_STEPS = ("cropping", "intensity_rescaling_area", "bkg_removal", "registration_calculation",
              "registration_transformation", "destriping", "resampling", "cropping_final")


def write_demo_project(folder: str | os.PathLike, *, shape=(120, 256, 256), seed: int = 0,
                       steps=DEMO_STEPS, truth: bool = True) -> tuple[Path, SyntheticCase]:
    """Write the synthetic case (without its ground truth if not ``truth``) and its ``params.toml``;
    return the TOML path and the case."""
    from pystack3d_dask.steps import available

    spec = SyntheticCase(tuple(shape), seed=seed)
    stack_dir, _ = write_case(spec, folder, truth=truth)
    steps = [s for s in steps if s in available()]
    b = spec.border
    text = PARAMS.format(nproc=os.cpu_count() or 1, steps=steps, b=b, xb=b + shape[2], yb=b + shape[1],
                         policy=POLICY, dz=DZ)
    toml = stack_dir / "params.toml"
    toml.write_text(text)
    return toml, spec


def run_demo(folder: str | os.PathLike = "pystack3d_dask_demo", *, shape=(120, 256, 256), cluster=None,
             quiet: bool = False) -> dict:
    """Run the demo; print and return, per step, the distance to the ground truth."""
    from pystack3d_dask.engine import Project
    from pystack3d_dask.quality import compare
    from pystack3d_dask.report import PAGE, REPORT_DIR

    folder = Path(folder)
    print(f"writing the synthetic stack {shape[0]} x {shape[1]} x {shape[2]} and its ground truth to {folder}")
    toml, spec = write_demo_project(folder, shape=shape)
    project = Project(toml, cluster=cluster, quiet=quiet)
    results = {}
    header = f"{'step':<28}{'rmse':>7}{'trend':>7}{'mean':>7}{'std':>7}{'shift px':>9}{'stripes':>9}{'slices':>7}"
    rows = []
    for name in ("input",) + project.config.process_steps:
        last = name == project.config.process_steps[-1]  # one report, at the end, not one per step
        project.run([] if name == "input" else [name], plots=last)
        q = compare(project.result(name), project.zpos(name), spec.truth_slice, dz=DZ, ntruth=shape[0])
        results[name] = q
        rows.append(f"{name:<28}{q.rmse:7.2f}{q.trend_rms:7.2f}{q.mean_err:7.2f}{q.std_err:7.2f}"
                    f"{q.max_shift_px:9.2f}{q.stripe_ratio:9.2f}{q.nslices:7d}")
        if not quiet:
            print(f"  {name}: done")
    print("\nDistance to the ground truth after each step (grey levels; mean error in units of the truth's")
    print("slice-to-slice spread; std: relative contrast error; stripes: stripe power / the truth's):")
    print(header)
    print("\n".join(rows))
    print(f"\nstore: {project.store_path}")
    print(f"report: {project.store_path.parent / REPORT_DIR / PAGE}")
    print(f"parameters: {toml}")
    print(f"ground truth: {folder / 'truth'}")
    print(f"export a step for Fiji: pystack3d-dask export {toml.parent} --step {name} --format tiff OUT")
    return results
