"""Registry of the correction steps, by their PyStack3D name.

Each step lives in its own module exposing ``STEP`` (a
:class:`~pystack3d_dask.steps.base.Step`); modules are imported on first use.
"""

from __future__ import annotations

import importlib

from pystack3d_dask.steps.base import Step

#: step name -> module; ``cropping_final`` is ``cropping`` run at the end (its ``FINAL_STEP``).
_MODULES = {
    "cropping": "cropping",
    "bkg_removal": "bkg_removal",
    "intensity_rescaling": "intensity_rescaling",
    "intensity_rescaling_area": "intensity_rescaling_area",
    "registration_calculation": "registration_calculation",
    "registration_transformation": "registration_transformation",
    "destriping": "destriping",
    "resampling": "resampling",
    "cropping_final": "cropping",
}

STEP_NAMES: tuple[str, ...] = tuple(_MODULES)


def available() -> tuple[str, ...]:
    """Names of the steps whose module is installed (the others are not implemented yet)."""
    names = []
    for name in STEP_NAMES:
        try:
            get_step(name)
        except ModuleNotFoundError:
            continue
        names.append(name)
    return tuple(names)


def get_step(name: str) -> Step:
    """Return the :class:`Step` called ``name`` (``KeyError`` if unknown)."""
    module = importlib.import_module(f"pystack3d_dask.steps.{_MODULES[name]}")
    return module.FINAL_STEP if name == "cropping_final" else module.STEP
