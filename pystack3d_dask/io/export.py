"""Export a stack to a folder of single-page TIFFs that Fiji opens as an image sequence."""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import numpy as np

from pystack3d_dask.errors import StoreError


def export_tiff(
    stack: da.Array,
    folder: str | os.PathLike,
    *,
    prefix: str = "slice",
    zpos: np.ndarray | None = None,
    pixel_size_um: float | None = None,
) -> Path:
    """Write every slice of ``stack`` as ``{prefix}_{k:05d}[_z={z}um].tif`` in ``folder``.

    Slices are computed chunk by chunk (never the whole stack at once).  The z
    position, when known, is written in the file name (PyStack3D's policy) and
    the z spacing in the ImageJ metadata so Fiji shows the right voxel depth.
    """
    import tifffile

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the export folder {folder}: {exc}") from None
    if any(folder.iterdir()):
        raise StoreError(f"export folder {folder} is not empty: choose an empty or new folder.")
    spacing = float(np.median(np.diff(zpos))) if zpos is not None and len(zpos) > 1 else None
    metadata = {"spacing": spacing, "unit": "um"} if spacing else {}
    resolution = (1 / pixel_size_um, 1 / pixel_size_um) if pixel_size_um else None
    start = 0
    for block in stack.blocks:
        data = np.asarray(block.compute())
        for i, img in enumerate(data):
            k = start + i
            name = f"{prefix}_{k:05d}" + (f"_z={zpos[k]:.4f}um" if zpos is not None else "") + ".tif"
            tifffile.imwrite(folder / name, img, imagej=img.dtype != np.float64, metadata=metadata,
                             resolution=resolution)
        start += data.shape[0]
    return folder
