"""Ctrl-C and SIGTERM during a run: stop it cleanly, never lose its written work.

For the duration of a run, SIGINT and SIGTERM raise
:class:`~pystack3d_dask.errors.Interrupted` in the main thread, so that the
``finally`` clauses close the worker processes, clusters and batch jobs, and
every chunk already written stays for the next run to resume from.  Our own
handlers are needed because the defaults do not hold: SIGTERM's kills the
process at once (its worker processes survive), and libraries replace
SIGINT's at import (``dask_jobqueue`` installs ``sys.exit``).  The previous
handlers are restored when the run ends.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from pystack3d_dask.errors import Interrupted, Stopped

log = logging.getLogger("pystack3d_dask")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


#: why the run stops, when another thread stopped it (see :func:`stop_run`); None while no run
_stop_reason: list[Stopped | None] | None = None


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` while the block runs (main thread only).

    The first signal raises; later ones, arriving while the run shuts its
    workers down, are only logged: an exception there would leave worker
    processes or batch jobs behind.
    """
    global _stop_reason
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    stopping, reason = None, [None]

    def handler(signum: int, frame) -> None:
        nonlocal stopping
        if stopping is not None:
            log.warning("stopping: closing the workers, please wait")
            return
        stopping = reason[0] or Interrupted(signum)
        raise stopping

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    _stop_reason = reason
    try:
        yield
        if stopping is not None:
            # the exception was raised where Python only prints it (a weakref callback, a __del__)
            # or a library swallowed it: the run went on, but it was asked to stop
            raise stopping
    finally:
        _stop_reason = None
        _restore(previous)


def stop_run(reason: Stopped) -> None:
    """Stop the run in progress with ``reason``, from any thread (e.g. a watchdog).

    The main thread may be blocked in a wait: a real signal wakes it, where
    an exception set from another thread would wait for the wait to end.
    """
    target = _stop_reason
    if target is None:
        log.error("%s", reason)  # no run to stop
        return
    target[0] = reason
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


@contextlib.contextmanager
def keep_handlers(*signals: int) -> Iterator[None]:
    """Restore the handlers of ``signals`` after the block (for imports that replace them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in signals}
    try:
        yield
    finally:
        _restore(previous)


def _restore(handlers: dict) -> None:
    for sig, old in handlers.items():
        # None: a handler set outside Python; the default is the closest we can restore
        signal.signal(sig, old if old is not None else signal.SIG_DFL)
