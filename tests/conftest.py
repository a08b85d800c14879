"""Shared fixtures: small TIFF projects on disk and a LocalCluster."""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile


@pytest.fixture(autouse=True)
def report_in_place(request, monkeypatch):
    """Runs draw their report in place, unless the test is marked ``report_process``.

    The report's process costs ~1 s of CPU to start, per run: in every test that
    runs a project it made the suite take twice as long.  Runs in a subprocess
    (the CLI) and module-scoped fixtures draw in the process, as users' runs do.
    """
    if request.node.get_closest_marker("report_process") is None:
        import pystack3d_dask.report
        from pystack3d_dask.report.writer import ReportWriter

        monkeypatch.setattr(pystack3d_dask.report, "ReportWriter", functools.partial(ReportWriter, background=False))


def write_slices(folder: Path, stack: np.ndarray, *, zpos=None, prefix: str = "slice") -> list[Path]:
    """Write ``stack`` as one TIFF per slice, named with PyStack3D's z policy."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, img in enumerate(stack):
        z = k * 0.01 if zpos is None else zpos[k]
        path = folder / f"{prefix}_{k}_z={z:.4f}um.tif"
        tifffile.imwrite(path, img)
        paths.append(path)
    return paths


#: a destriping run long enough to interrupt (no early stop), for the interrupt and cluster tests
DESTRIPING = """
nproc = 2
process_steps = ["destriping"]
[destriping]
maxit = 200
cvg_threshold = 0
filters = [{ name = "Gabor", noise_level = 20, sigma = [0.5, 20], theta = 0 }]
"""


def write_params(folder: Path, text: str) -> Path:
    path = folder / "params.toml"
    path.write_text(text)
    return path


def tree_digest(folder: Path) -> dict[str, str]:
    """Content digest of every file under ``folder`` (to prove nothing changed)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def random_stack(shape=(12, 24, 20), dtype="uint8", seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100, 30, shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)


#: every step, in the order of the demo (intensity_rescaling added), with the input first
REPORT_STEPS = ("input", "cropping", "intensity_rescaling_area", "intensity_rescaling", "bkg_removal",
                "registration_calculation", "registration_transformation", "destriping", "resampling",
                "cropping_final")


def demo_project(folder: Path) -> Path:
    """The demo's synthetic case, 24 x 48 x 48, on one process, with every step; returns its TOML."""
    from pystack3d_dask.demo import write_demo_project

    toml, _ = write_demo_project(folder, shape=(24, 48, 48), steps=REPORT_STEPS[1:])
    toml.write_text(re.sub(r"nproc = \d+", "nproc = 1", toml.read_text()))
    return toml


@pytest.fixture(scope="session")
def local_cluster():
    """A 2-process LocalCluster shared by the tests that compare schedulers."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster


def vendor_tags(vendor: str, *, pixel_nm: float = 5.0, wd_mm: float = 5.1, detector: str = "InLens",
                z_um: float | None = None) -> list[tuple]:
    """tifffile ``extratags`` of a slice as written by ``vendor``'s acquisition software."""
    if vendor == "zeiss":  # tag 34118: a key line in capitals, then "Label = value unit"
        text = (f"0\r\n0\r\nAP_IMAGE_PIXEL_SIZE\r\nImage Pixel Size = {pixel_nm} nm\r\n"
                f"AP_WD\r\nWD = {wd_mm} mm\r\nDP_DETECTOR_CHANNEL\r\nSignal A = {detector}\r\n"
                "AP_STAGE_AT_Z\r\nStage at Z = 25.0 mm\r\n")
        return [(34118, "s", 0, text, True)]
    if vendor == "fibics":  # tag 51023: XML, the pixel's x and y vectors in µm
        u = pixel_nm / 1e3
        zpos = "" if z_um is None else f"<ATLAS3D><Slice><ZPos>{z_um}</ZPos></Slice></ATLAS3D>"
        text = (f'<?xml version="1.0" encoding="iso-8859-1"?>\n<Fibics version="1.0"><Image><Detector>{detector}</Detector></Image>'
                f"<Scan><Ux>{u}</Ux><Uy>0</Uy><Vx>0</Vx><Vy>{u}</Vy><Dwell>100</Dwell></Scan>{zpos}</Fibics>")
        return [(51023, "s", 0, text, True)]
    if vendor == "fei":  # tag 34682: an INI text, lengths in metres
        text = (f"[User]\r\nUser=someone\r\n[Scan]\r\nPixelWidth={pixel_nm * 1e-9}\r\nPixelHeight={pixel_nm * 1e-9}\r\n"
                f"[Stage]\r\nWorkingDistance={wd_mm * 1e-3}\r\n[Detectors]\r\nName={detector}\r\nMode=SE\r\n")
        return [(34682, "s", 0, text, True)]
    raise ValueError(vendor)
