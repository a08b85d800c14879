"""Heavy modules imported on their first use.

Loading a project (its configuration, its store's attributes) needs neither
``dask.array`` nor scipy, which take about 1 s to import together; a run on a
complete project should not wait for them.  Modules that build graphs or run
kernels name them through :func:`lazy_module`.
"""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Stands for the module ``name``, imported when one of its attributes is first read.

    Each read goes through :func:`importlib.import_module` (a dictionary lookup
    once imported), whose import lock makes a first use from several worker
    threads at once safe, unlike ``importlib.util.LazyLoader`` on Python 3.11.
    """

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"


def lazy_module(name: str) -> Any:
    """The module ``name`` (e.g. ``"dask.array"``), imported when first used."""
    return LazyModule(name)
