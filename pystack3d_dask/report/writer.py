"""The report of a project: ``<project>/pystack3d_dask_report/index.html``, written during a run.

A run hands each step to :meth:`ReportWriter.step_done` as soon as it is
complete, and goes on at once: the report's own process
(:mod:`~pystack3d_dask.report.worker`, started with the first step) reads
what the figures need (statistics, state, the lines each step writes with its
result and the few whole slices shown; the step is complete, so no write
touches it) and draws them while the next step computes.  Ctrl-C, SIGTERM or
an error end the run without waiting for it (it is killed), and an
interrupted run writes no page.  Figures never change a result: a figure
that fails is reported on the page and in a warning.

Each step's section is kept beside the page (``sections/<step>.html``) with
what it was drawn from (the step's hash, status and channels): a later run
that does not recompute the step reuses it instead of reading and drawing
again, so a run with nothing to compute writes its page at once.

With ``keep="last"`` the engine deletes a step's images once the next step
is written; ``step_done`` then waits until the previous step's slices are
read (long done by then: reading them is far cheaper than the step).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from pystack3d_dask import __version__
from pystack3d_dask.report import figures, html
from pystack3d_dask.report.views import Views, read_views
from pystack3d_dask.report.worker import DrawingProcess
from pystack3d_dask.store import INPUT, StoredArray

log = logging.getLogger("pystack3d_dask")

REPORT_DIR = "pystack3d_dask_report"
PAGE = "index.html"
#: the last run's summary (what was computed, skipped, how long), kept for ``pystack3d-dask report``
RUN_FILE = "run.json"
#: each step's section as last drawn, first line its key (see ``ReportWriter._key``)
SECTIONS_DIR = "sections"


@dataclasses.dataclass(frozen=True)
class _Taken:
    """What the figures of one step and channel need from the store, taken on the run's thread."""

    stats: dict
    state: dict | None
    #: the stored result (see :meth:`Project.stored`), or None when its images are not stored (``keep="last"``)
    stack: StoredArray | None
    #: the result's lines for the report (see :meth:`Project.view_lines`), None without them
    lines: np.ndarray | None


class ReportWriter:
    """Builds a project's report step by step, in a process of its own or on the caller's thread.

    Parameters
    ----------
    project : Project
    folder : path, optional
        Default ``<store folder>/pystack3d_dask_report``.
    background : bool
        Read and draw in the report's process (during a run); False does it in :meth:`step_done`.
    """

    def __init__(self, project, *, folder: str | Path | None = None, background: bool = True):
        self.project = project
        self.folder = Path(folder) if folder is not None else project.store_path.parent / REPORT_DIR
        self.started = time.time()
        self._views: dict[str, Views] = {}  # by stored array: a step that aliases its input shares its views
        self._names: dict[tuple[str, str], str | None] = {}
        self._sections: dict[str, str] = {}
        self._broken: set[str] = set()  # steps with a failed figure: their sections are not kept
        self.background = background
        self._process: DrawingProcess | None = None

    # -- the run's side ----------------------------------------------------------------------------
    def step_done(self, step: str) -> None:
        """Have the figures of ``step``, just completed, drawn: by the report's process, or now."""
        if not self.background:
            self.draw(step)
            return
        try:
            if self._process is None:
                self._process = DrawingProcess(_readable(self.project), self.folder, self.started)
            if self.project.keep == "last":  # the engine deletes the previous step's images on return
                self._process.wait()
            self._process.figures(step)
        except Exception as exc:  # the report never fails a run: it is drawn here instead
            self._stop(exc)
            self.draw(step)

    def abort(self) -> None:
        """Stop drawing: the run failed or was interrupted and writes no page."""
        if self._process is not None:
            self._process.kill()
            self._process = None

    def finish(self, run: Any = None) -> Path | None:
        """Draw the steps not drawn yet and write the page; return its path.

        ``run`` is the engine's :class:`~pystack3d_dask.engine.RunReport` (None: show the last
        run's summary, saved beside the page).  A failure is a warning, never an error.
        """
        if self._process is not None:
            try:
                page, records = self._process.finish(dataclasses.replace(run, on_done=None))
            except Exception as exc:
                self._stop(exc)
            else:
                for level, message in records:
                    log.log(level, message)
                return page
        try:
            info = self.project.info()
            summary = self._summary(run, info)
            for step, entry in info["steps"].items():
                if entry["status"].startswith("complete"):
                    self._section(step, entry)
            order = [s for s in (INPUT,) + tuple(self.project.config.process_steps) if s in self._sections]
            sections = [(s, s, self._sections[s]) for s in order]
            text = html.page(title=f"pystack3d-dask report: {self.project.config.project_dir.name}",
                             summary=summary, sections=sections)
            return html.write_atomic(self.folder / PAGE, text)
        except Exception as exc:  # the report never fails a run
            log.warning("the report could not be written in %s: %s", self.folder, exc)
            return None

    def _stop(self, exc: Exception) -> None:
        """The report's process failed: draw in the run's process from now on."""
        log.warning("report: %s; the figures are drawn in the run's process instead.", exc)
        self.abort()
        self.background = False

    def draw(self, step: str, *, on_read: Callable[[], None] | None = None) -> None:
        """Read what ``step``'s figures need and draw them; ``on_read()`` once its images are read.

        A failure becomes a note in the step's section and a warning.
        """
        try:
            taken = self._take(step)
        except Exception as exc:
            self._sections[step] = self._failure(step, exc)
            taken = None
        else:
            self._guard(step, lambda: self._views_of(step, taken))
        if on_read is not None:
            on_read()
        if taken is not None:
            self._guard(step, lambda: self._draw(step, taken))

    def _guard(self, step: str, job: Callable[[], Any]) -> None:
        """Run ``job``; a failure becomes a note in the step's section and a warning."""
        try:
            job()
        except Exception as exc:
            self._sections[step] = self._sections.get(step, "") + self._failure(step, exc)

    def _failure(self, step: str, exc: Exception) -> str:
        """The page's note of a failed figure of ``step`` (a warning too)."""
        self._broken.add(step)
        return _failed(step, exc)

    # -- what a step's figures need ----------------------------------------------------------------
    def _channels(self) -> list[str]:
        return list(self.project.config.channels)

    def _previous(self, step: str) -> str | None:
        steps = (INPUT,) + tuple(self.project.config.process_steps)
        i = steps.index(step)
        return steps[i - 1] if i > 0 else None

    def _section(self, step: str, entry: dict) -> None:
        """Draw ``step``'s section unless this run drew it or an earlier one drew the same result; keep it.

        ``entry`` is the step's line of ``project.info()``.  A section with a failed
        figure is drawn again next time.
        """
        path = self.folder / SECTIONS_DIR / f"{step}.html"
        # what the section shows: the result (its hash covers every earlier step), its status, the
        # channels, and this version's figures
        key = "<!-- " + json.dumps([entry.get("hash"), entry["status"], self._channels(), __version__]) + " -->"
        if step not in self._sections:
            try:
                first, _, section = path.read_text(encoding="utf-8").partition("\n")
            except OSError:
                first = section = None
            if first == key:
                self._sections[step] = section
                return
            self.draw(step)
        if step not in self._broken:
            html.write_atomic(path, f"{key}\n{self._sections[step]}")

    def _take(self, step: str) -> dict[str, _Taken]:
        """Statistics, state, lazy result and lines of ``step`` per channel."""
        images = self.project.has_images(step)
        return {ch: _Taken(stats=self.project.stats(step, ch),
                           state=None if step == INPUT else self.project.state(step, ch),
                           stack=self.project.stored(step, ch) if images else None,
                           lines=self.project.view_lines(step, ch) if images else None)
                for ch in self._channels()}

    def _views_of(self, step: str, taken: dict[str, _Taken]) -> None:
        """Read the planes of ``step``'s result (once per stored array), keeping the slice most curtained before it.

        The views of the steps before its input are let go.
        """
        prev = self._previous(step)
        for ch, t in taken.items():
            if t.stack is None:
                self._names[step, ch] = None
                continue
            self._names[step, ch] = t.stack.node
            if t.stack.node not in self._views:
                before = self._cached(prev, ch)
                extra = [before.most_striped] if before is not None else []
                self._views[t.stack.node] = read_views(t.stack, lines=t.lines, slices=extra)
        # only this step's views and its input's are drawn from now on: at 10 000 slices of 8192²
        # the views of a step hold 640 MiB
        kept = {self._names.get((s, ch)) for s in (prev, step) for ch in taken}
        self._views = {name: views for name, views in self._views.items() if name in kept}

    def _cached(self, step: str | None, channel: str) -> Views | None:
        name = self._names.get((step, channel)) if step is not None else None
        return self._views.get(name) if name is not None else None

    def _draw(self, step: str, taken: dict[str, _Taken]) -> None:
        prev = self._previous(step)
        parts = [_parameters(self.project, step)]
        for ch, t in taken.items():
            before, after = self._cached(prev, ch), self._cached(step, ch)
            if len(taken) > 1:
                parts.append(f"<h3>channel {escape(ch)}</h3>")
            groups = [functools.partial(figures.stats_figures, t.stats)]
            if step in figures.STATE_FIGURES and t.state is not None:
                groups.append(functools.partial(figures.STATE_FIGURES[step], t.state, before, after))
            if t.stack is None:
                parts.append('<p class="warn">images not stored (keep="last"): no cut-planes.</p>')
            groups.append(functools.partial(figures.cut_planes, before, after))
            for group in groups:  # one failing figure leaves the others
                try:
                    parts += group()
                except Exception as exc:
                    parts.append(self._failure(step, exc))
        self._sections[step] = "".join(parts) + self._sections.get(step, "")

    # -- summary -----------------------------------------------------------------------------------
    def _summary(self, run: Any, info: dict) -> str:
        run_file = self.folder / RUN_FILE
        if run is not None:
            record = {"done": run.done, "computed": run.computed, "seconds": run.seconds, "skipped": run.skipped,
                      "messages": run.messages, "started": self.started, "finished": time.time()}
            html.write_atomic(run_file, json.dumps(record, indent=1))
        elif run_file.exists():
            record = json.loads(run_file.read_text())
        else:
            record = None
        return summary(self.project, record, info)


def _readable(project):
    """``project`` without its cluster (a live client or cluster of the API): the report only reads."""
    replica = copy.copy(project)
    replica.cluster = None
    return replica


def _failed(step: str, exc: Exception) -> str:
    """Say in a warning and on the page that a figure of ``step`` failed."""
    log.warning("report: the figures of %s failed: %s: %s", step, type(exc).__name__, exc)
    return f'<p class="warn">figures failed: {escape(type(exc).__name__)}: {escape(str(exc))}</p>'


def _parameters(project, step: str) -> str:
    params = project.config.step_params.get(step)
    if params is None:
        return ""
    lines = "\n".join(f"{k} = {json.dumps(v, default=str)}" for k, v in dataclasses.asdict(params).items())
    return f"<details><summary>parameters</summary><pre>{escape(lines)}</pre></details>"


def summary(project, record: dict | None, info: dict) -> str:
    """The run summary: the project (``info`` is ``project.info()``), then one row per step (status, what
    the last run did, time)."""
    cfg = project.config
    first = info["steps"].get(INPUT, {})
    about = [("parameters", str(cfg.toml_path or "(given as a table)")), ("input folder", str(cfg.project_dir)),
             ("store", str(project.store_path)), ("channels", ", ".join(cfg.channels)),
             ("input", f"{first.get('shape')} {first.get('dtype', '')}"), ("nproc", str(cfg.nproc))]
    about += [(f"metadata: {k}", json.dumps(v) if isinstance(v, (list, dict)) else str(v))
              for k, v in (info.get("metadata") or {}).items() if v is not None]  # read from the TIFF tags
    if record is not None:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["started"]))
        about.append(("last run", f"{start}, {record['finished'] - record['started']:.1f} s"))
    rows = []
    for step, entry in info["steps"].items():
        did, seconds = "", ""
        if record is not None:
            if step in record["done"]:
                total = (entry.get("shape") or [0])[0] * len(cfg.channels)
                n = record["computed"].get(step, 0)
                did = f"resumed: {n} of {total} slices computed" if 0 < n < total else "computed"
                seconds = f"{record['seconds'].get(step, 0):.1f}"
            elif step in record["skipped"]:
                did = "skipped (already complete)"
        rows.append([f'<a href="#{escape(step)}">{escape(step)}</a>', escape(entry["status"]), did,
                     f'<span class="n">{seconds}</span>', escape(str(entry.get("shape", "")))])
    out = html.table(["", ""], [[escape(k), escape(v)] for k, v in about])
    out += html.table(["step", "status", "last run", "seconds", "shape (z, y, x)"], rows)
    for message in (record or {}).get("messages", []):
        out += f'<p class="warn">{escape(message)}</p>'
    return out
