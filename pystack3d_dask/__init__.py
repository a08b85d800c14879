"""pystack3d-dask: out-of-core, Dask-chunked stack correction (PyStack3D compatible).

Two ways in:

* :class:`Project` runs a PyStack3D ``params.toml`` on a folder of TIFFs, with
  a Zarr v3 store, chunk-level resume and any dask scheduler;
* the array-level functions in :mod:`pystack3d_dask.api` (``crop``,
  ``bkg_removal``, ...) take any numpy / dask / Zarr ``(z, y, x)`` array and
  return a lazy dask array.
"""

from pystack3d_dask.errors import ConfigError, InputError, PyStack3DError, StepError, StoreError

__version__ = "0.1.0"


def __getattr__(name):
    # Keep ``import pystack3d_dask`` cheap: the engine pulls in dask.distributed.
    if name == "Project":
        from pystack3d_dask.engine import Project

        return Project
    if name == "api":
        import importlib

        return importlib.import_module("pystack3d_dask.api")
    raise AttributeError(name)


__all__ = ["ConfigError", "InputError", "Project", "PyStack3DError", "StepError", "StoreError"]
