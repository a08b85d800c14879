"""The package's own exceptions.

Every error a user can cause names the file, key or value at fault and says
what is allowed.  They derive from the builtin that fits (``ValueError`` for a
bad value, ``OSError`` for files) so generic handlers keep working.
"""

from __future__ import annotations


class PyStack3DError(Exception):
    """Base class of every error raised on purpose by pystack3d-dask."""


class ConfigError(PyStack3DError, ValueError):
    """A parameter file or API argument is invalid (unknown key, bad type or value)."""


class InputError(PyStack3DError, ValueError):
    """The input images are unusable (missing, corrupt, inconsistent shapes or dtypes)."""


class StoreError(PyStack3DError, OSError):
    """The project store cannot be written, is locked by another run, or is inconsistent."""


class DamagedError(StoreError):
    """A stored chunk of ``node`` from slice ``start`` fails its checksum or cannot be decoded (``reason``)."""

    def __init__(self, message: str, node: str, start: int, reason: str):
        super().__init__(message)
        self.node, self.start, self.reason = node, start, reason

    def __reduce__(self):  # raised in workers: keep the fields through pickling
        return type(self), (str(self), self.node, self.start, self.reason)


class DiskFullError(StoreError):
    """The disk is full: what was written stays, for a run with more space to resume from."""


class StepError(PyStack3DError, ValueError):
    """A step cannot run on this data (e.g. a threshold leaves no pixel in a slice)."""


class Stopped(BaseException):
    """A run stopped before its end, not by an error in the computation: every chunk written is kept.

    A ``BaseException`` like ``KeyboardInterrupt``, so that the ``except
    Exception`` clauses that roll back an error's partial work let it through.
    """

    #: the command's exit status
    exit_code = 1


class Interrupted(Stopped):
    """A run was stopped by a signal (Ctrl-C, SIGTERM)."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__("interrupted; run again to resume")

    @property
    def exit_code(self) -> int:
        """The shell's status for a process ended by this signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


class WorkersLost(Stopped):
    """A distributed run had no worker for too long (every batch job ended, none could start)."""

    #: EX_TEMPFAIL: a temporary failure, run again
    exit_code = 75

    def __init__(self, what: str, timeout: float, progress: str = ""):
        self.what, self.timeout = what, timeout
        super().__init__(f"{what}; {progress + '; ' if progress else ''}run again to resume "
                         f"(no worker for {timeout:g} s: [cluster] no_worker_timeout)")

    def during(self, progress: str) -> WorkersLost:
        """The same error, saying how far the step went (e.g. "3 of 8 chunks of destriping written")."""
        return WorkersLost(self.what, self.timeout, progress)
