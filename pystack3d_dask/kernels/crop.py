"""Areas in PyStack3D's convention and the crop kernel.

An ``area = [xmin, xmax, ymin, ymax]`` is given in pixels with the origin at
the **bottom-left** corner of the image: it selects rows ``H - ymax : H - ymin``
and columns ``xmin : xmax`` of a ``(y, x)`` array.  PyStack3D's own files write
``99999`` for "to the edge", so an area reaching past the image is clipped to
it (with a warning); an area that leaves nothing is an error.
"""

from __future__ import annotations

import warnings

import numpy as np

from pystack3d_dask.errors import ConfigError

#: Sentinel PyStack3D uses for "to the edge": clipping to it is silent.
EDGE = 99999


def area_slices(
    area: tuple[int, int, int, int], shape: tuple[int, int], *, key: str = "area"
) -> tuple[slice, slice]:
    """Return ``(rows, cols)`` slices selecting ``area`` in an image of ``shape = (H, W)``.

    Parameters
    ----------
    area : (xmin, xmax, ymin, ymax)
        Bottom-left origin, in pixels.
    shape : (H, W)
        Image shape.
    key : str
        Name used in messages, e.g. ``"[cropping] area"``.

    Raises
    ------
    ConfigError
        If the area is malformed or leaves no pixel once clipped to the image.
    """
    if len(area) != 4:
        raise ConfigError(f"{key} = {list(area)!r} is invalid: expected [xmin, xmax, ymin, ymax].")
    xmin, xmax, ymin, ymax = (int(v) for v in area)
    h, w = int(shape[0]), int(shape[1])
    if xmin >= xmax or ymin >= ymax:
        raise ConfigError(
            f"{key} = {list(area)!r} is invalid: expected xmin < xmax and ymin < ymax."
        )
    cx = (max(xmin, 0), min(xmax, w))
    cy = (max(ymin, 0), min(ymax, h))
    if cx[0] >= cx[1] or cy[0] >= cy[1]:
        raise ConfigError(
            f"{key} = {list(area)!r} leaves no pixel in an image of {w} x {h} px (width x height)."
        )
    clipped = (cx[0], cx[1], cy[0], cy[1])
    if clipped != (xmin, xmax, ymin, ymax) and EDGE not in (xmax, ymax):
        warnings.warn(
            f"{key} = {list(area)!r} reaches past the {w} x {h} px image; clipped to {list(clipped)}.",
            stacklevel=2,
        )
    return slice(h - cy[1], h - cy[0]), slice(cx[0], cx[1])


def crop(image: np.ndarray, area: tuple[int, int, int, int]) -> np.ndarray:
    """Crop the last two axes of ``image`` to ``area`` (bottom-left origin); a view."""
    rows, cols = area_slices(area, image.shape[-2:])
    return image[..., rows, cols]
