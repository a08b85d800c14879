"""Array-level API: every step on any numpy / dask / Zarr ``(z, y, x)`` array, no project needed.

Each function validates its keyword parameters exactly like the TOML table of
the same name, computes the step's global state now and returns the corrected
stack lazily (a dask array chunked by whole slices, in the input dtype), with
the state where the step has one.

>>> import numpy as np
>>> from pystack3d_dask.api import crop
>>> crop(np.zeros((4, 100, 80), np.uint8), area=(10, 70, 0, 50)).shape
(4, 50, 60)
"""

from pystack3d_dask.steps.base import as_stack, run_step
from pystack3d_dask.steps.bkg_removal import bkg_removal
from pystack3d_dask.steps.cropping import crop
from pystack3d_dask.steps.destriping import destriping
from pystack3d_dask.steps.intensity_rescaling import intensity_rescaling
from pystack3d_dask.steps.intensity_rescaling_area import intensity_rescaling_area
from pystack3d_dask.steps.registration_calculation import registration_calculation
from pystack3d_dask.steps.registration_transformation import registration_transformation
from pystack3d_dask.steps.resampling import resampling

__all__ = ["as_stack", "bkg_removal", "crop", "destriping", "intensity_rescaling", "intensity_rescaling_area",
           "registration_calculation", "registration_transformation", "resampling", "run_step"]
