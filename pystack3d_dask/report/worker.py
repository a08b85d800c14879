"""The report's own process: it reads and draws while the run computes, and never takes the run's GIL.

Drawing in a thread of the run's process made a run take 1.14x the time of
the same run with ``--no-plots`` (120 x 256², two cores, median of 6 runs
alternated), though the figures take a tenth of the run's CPU: the thread's
Python code (charts, encoding, bookkeeping) holds the GIL in stretches that
stall the scheduler's threads between their numpy calls.  In a process of
its own the same work costs 1.06x.

:class:`DrawingProcess` is the run's side: it starts
``python -c "...worker import main; main()"`` (a fresh interpreter, not a
multiprocessing child: that would import the user's script again, and a
script without an ``if __name__ == "__main__":`` guard would run again) and
sends it pickled requests on its stdin, in order, one reply each on its
stdout.  :func:`main` is the process's side: a
:class:`~pystack3d_dask.report.writer.ReportWriter` drawing in place.  The
process ignores SIGINT (a Ctrl-C reaches the whole process group; the run
decides what stops), ends once the page is written or when its stdin
closes, and is killed when the run stops on an error or a signal.  What it logs comes back with its last reply
and is logged by the run, under the run's logging settings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pystack3d_dask

#: the requests (see :func:`main`)
FIGURES, FINISH = "figures", "finish"


class DrawingProcess:
    """The report's process, started now, drawing for ``ReportWriter(project, folder=folder)``.

    ``started``: the run's start time, shown in the summary.
    """

    def __init__(self, project, folder: Path, started: float):
        # the package's folder last on the path: found where the interpreter would not find it
        # (a checkout run from its folder), never ahead of the standard library
        parent = str(Path(pystack3d_dask.__file__).resolve().parents[1])
        code = f"import sys; sys.path.append({parent!r}); from pystack3d_dask.report.worker import main; main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._pending = 0  # requests whose reply is not read yet
        self._send((project, folder, started))

    def figures(self, step: str) -> None:
        """Ask for ``step``'s figures (answered once its images are read, see :meth:`wait`)."""
        self._send((FIGURES, step))
        self._pending += 1

    def wait(self) -> None:
        """Wait until every step asked for has its images read."""
        while self._pending:
            self._reply()
            self._pending -= 1

    def finish(self, run: Any) -> tuple[Path | None, list[tuple[int, str]]]:
        """Write the page (see ``ReportWriter.finish``); its path and what the process logged.

        Raises
        ------
        OSError
            The process stopped before it answered (its exit status is in the message).
        """
        try:
            self._send((FINISH, run))
            self.wait()
            page, records = self._reply()
        except BaseException:  # Ctrl-C while the last figures are drawn, too
            self.kill()
            raise
        self.proc.stdin.close()
        self.proc.wait()
        self.proc.stdout.close()
        return page, records

    def kill(self) -> None:
        """Stop the process now (a run that did not end writes no page)."""
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):  # the unsent rest of a request
                pipe.close()

    def _send(self, request: Any) -> None:
        try:
            pickle.dump(request, self.proc.stdin)
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._stopped() from None

    def _reply(self) -> Any:
        try:
            return pickle.load(self.proc.stdout)
        except EOFError:
            raise self._stopped() from None

    def _stopped(self) -> OSError:
        return OSError(f"the report's process stopped (exit status {self.proc.wait()})")


class _Records(logging.Handler):
    """What the process logs, kept for the run to log."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))


def main() -> None:
    """Serve a :class:`DrawingProcess`: requests on stdin, replies on stdout (other output goes to stderr)."""
    from pystack3d_dask.report.writer import ReportWriter

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print must not break the replies
    requests = sys.stdin.buffer
    kept = _Records()
    logging.getLogger().addHandler(kept)
    logging.captureWarnings(True)
    warnings.simplefilter("default")

    def reply(value: Any) -> None:
        pickle.dump(value, replies)
        replies.flush()

    project, folder, started = pickle.load(requests)
    writer = ReportWriter(project, folder=folder, background=False)
    writer.started = started
    while True:
        try:
            kind, value = pickle.load(requests)
        except EOFError:  # the run ended without a page (killed, or its process died)
            return
        if kind == FIGURES:
            writer.draw(value, on_read=lambda: reply(None))
        else:
            reply((writer.finish(value), kept.records))
            sys.stderr.flush()
            os._exit(0)  # the page is written: the interpreter's teardown (0.2 s) would delay the run's end

