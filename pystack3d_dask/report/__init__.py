"""The report of a project: one self-contained HTML page with every step's figures.

``<project>/pystack3d_dask_report/index.html`` is written at the end of every
run (see :class:`ReportWriter`) and by :func:`write_report` (``pystack3d-dask
report``): the run summary, then per step its statistics along z, its own
plots (coefficients, histograms, shifts, z positions, stripes) and cut-planes
before and after it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pystack3d_dask.report.writer import PAGE, REPORT_DIR, ReportWriter

__all__ = ["PAGE", "REPORT_DIR", "ReportWriter", "write_report"]


def write_report(project, *, folder: str | os.PathLike | None = None) -> Path | None:
    """Write the report of every complete step of ``project``; return the page's path.

    The summary shows the last run's (saved beside the page by that run).
    """
    project.info()  # no store yet: a clear error here, not a warning from the writer
    return ReportWriter(project, folder=folder, background=False).finish()
