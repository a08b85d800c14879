"""Export a stack to a folder of single-page TIFFs that Fiji opens as an image sequence.

Each file is written under a temporary name and renamed when whole, so an
interrupted export leaves only whole files; a manifest (``.pystack3d_export.json``)
names what the folder holds, so that running the same export again completes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dask.array as da
import numpy as np

from pystack3d_dask.errors import StoreError
from pystack3d_dask.store import write_error

MANIFEST = ".pystack3d_export.json"
PARTIAL = ".partial"


def export_tiff(
    stack: da.Array,
    folder: str | os.PathLike,
    *,
    prefix: str = "slice",
    zpos: np.ndarray | None = None,
    pixel_size_um: float | None = None,
    source: str | None = None,
) -> Path:
    """Write every slice of ``stack`` as ``{prefix}_{k:05d}[_z={z}um].tif`` in ``folder``.

    Slices are computed chunk by chunk (never the whole stack at once).  The z
    position, when known, is written in the file name (PyStack3D's policy) and
    the z spacing in the ImageJ metadata so Fiji shows the right voxel depth.

    Parameters
    ----------
    source : str, optional
        What is exported (e.g. the step's hash): a folder holding a part of the same
        export (same ``source``, ``prefix`` and shape) is completed; any other
        non-empty folder is refused.

    Raises
    ------
    StoreError
        The folder holds other files, or cannot be written (disk full: the space needed).
    """
    import tifffile

    folder = Path(folder)
    names = [f"{prefix}_{k:05d}" + (f"_z={zpos[k]:.4f}um" if zpos is not None else "") + ".tif"
             for k in range(stack.shape[0])]
    manifest = {"source": source, "prefix": prefix, "shape": list(stack.shape), "dtype": str(stack.dtype)}
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the export folder {folder}: {exc}") from None
    _claim(folder, manifest, set(names))
    spacing = float(np.median(np.diff(zpos))) if zpos is not None and len(zpos) > 1 else None
    metadata = {"spacing": spacing, "unit": "um"} if spacing else {}
    resolution = (1 / pixel_size_um, 1 / pixel_size_um) if pixel_size_um else None
    start = 0
    for block in stack.blocks:
        stop = start + block.shape[0]
        todo = [k for k in range(start, stop) if not (folder / names[k]).exists()]
        if todo:
            data = np.asarray(block.compute())
            for k in todo:
                img, tmp = data[k - start], folder / (names[k] + PARTIAL)
                try:
                    tifffile.imwrite(tmp, img, imagej=img.dtype != np.float64, metadata=metadata,
                                     resolution=resolution)
                    os.replace(tmp, folder / names[k])  # whole or absent, never truncated
                except OSError as exc:
                    tmp.unlink(missing_ok=True)
                    raise write_error(exc, folder, img.nbytes, "a slice") from None
        start = stop
    return folder


def _claim(folder: Path, manifest: dict, names: set[str]) -> None:
    """Write the manifest in an empty folder, or check that the folder holds a part of this export."""
    path = folder / MANIFEST
    for tmp in folder.glob(f"*{PARTIAL}"):  # left by an export killed mid-file
        tmp.unlink()
    present = {p.name for p in folder.iterdir()} - {MANIFEST}
    if not present and not path.exists():
        path.write_text(json.dumps(manifest))
        return
    try:
        same = path.exists() and json.loads(path.read_text()) == manifest and manifest["source"] is not None
    except ValueError:
        same = False
    if not same or not present <= names:
        raise StoreError(f"export folder {folder} is not empty and holds no unfinished export of this result: "
                         "choose an empty or new folder.")
