"""z positions of the input slices, parsed from their file names.

PyStack3D's ``[resampling] policy`` describes the file names, e.g. the default
``"slice_{slice_nb}_z={z_coord}um.tif"``: ``{slice_nb}`` stands for an integer,
``{z_coord}`` for a decimal number (``1.0894``, ``-3e-2``), everything else is
literal text (``{{`` and ``}}`` are literal braces).  Names are matched whole,
on their last path component.

The z positions of a stack are a float64 array, one value per slice in the
order of the (sorted) file names, strictly increasing: two slices at the same
or a decreasing z mean the names and positions disagree, which is an input
error, never silently re-sorted.  They share the unit of the file names.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from pathlib import PurePath

import numpy as np

from pystack3d_dask.errors import ConfigError, InputError

#: PyStack3D's default policy
DEFAULT_POLICY = "slice_{slice_nb}_z={z_coord}um.tif"

#: regular expression of each placeholder a policy may hold
PLACEHOLDERS = {
    "slice_nb": r"\d+",
    "z_coord": r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?",
}


def compile_policy(policy: str, *, key: str = "[resampling] policy") -> re.Pattern[str]:
    """Return the regular expression matching the file names described by ``policy``.

    Parameters
    ----------
    policy : str
        Text with the placeholders ``{slice_nb}`` and ``{z_coord}``
        (required); any other text is literal.
    key : str
        Name of the parameter, for messages.

    Raises
    ------
    ConfigError
        The policy has no ``{z_coord}``, an unknown placeholder or unbalanced braces.

    Examples
    --------
    >>> compile_policy("s{slice_nb}_z={z_coord}.tif").fullmatch("s7_z=-1.5.tif")["z_coord"]
    '-1.5'
    """
    parts = []
    seen = set()
    try:
        fields = list(string.Formatter().parse(policy))
    except ValueError as exc:
        raise ConfigError(f"{key} = {policy!r} is invalid: {exc} (write '{{{{' for a literal brace).") from None
    for literal, name, _spec, _conv in fields:
        parts.append(re.escape(literal))
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            raise ConfigError(
                f"{key} = {policy!r} is invalid: unknown placeholder {{{name}}}; "
                f"allowed: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}."
            )
        # a placeholder used twice must carry the same text both times
        parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>{PLACEHOLDERS[name]})")
        seen.add(name)
    if "z_coord" not in seen:
        raise ConfigError(f"{key} = {policy!r} is invalid: it must hold {{z_coord}}, the z position.")
    return re.compile("".join(parts))


def parse_zpos(names: Sequence[str], policy: str = DEFAULT_POLICY) -> np.ndarray:
    """Return the z position of each file, read from its name through ``policy``.

    Parameters
    ----------
    names : sequence of str
        File names or paths, in slice order (sorted by name).
    policy : str
        File-name pattern, see :func:`compile_policy`.

    Returns
    -------
    numpy.ndarray
        float64, shape ``(len(names),)``, strictly increasing.

    Raises
    ------
    InputError
        A name does not match the policy (the first one is named), or the
        positions do not increase strictly (the two files are named).
    ConfigError
        The policy itself is invalid.

    Examples
    --------
    >>> parse_zpos(["slice_00001_z=1.0894um.tif", "slice_00002_z=1.1um.tif"])
    array([1.0894, 1.1   ])
    """
    pattern = compile_policy(policy)
    names = [str(n) for n in names]
    zpos = np.empty(len(names))
    for k, name in enumerate(names):
        match = pattern.fullmatch(PurePath(name).name)
        if match is None:
            raise InputError(
                f"file {name!r} does not match the z-position policy {policy!r} "
                f"({{z_coord}} is a number such as 1.0894 or -3e-2); "
                "rename the files or set [resampling] policy."
            )
        zpos[k] = float(match["z_coord"])
    return check_zpos(zpos, names)


def check_zpos(zpos, names: Sequence[str] | None = None, *, first_index: int = 0) -> np.ndarray:
    """Return ``zpos`` as a float64 vector after checking it is finite and strictly increasing.

    Parameters
    ----------
    zpos : array-like
        One z position per slice.
    names : sequence of str, optional
        File name of each slice, used in messages; without them slices are
        named by index.
    first_index : int
        Index of the first slice in the original numbering (for messages
        when ``names`` is not given).

    Raises
    ------
    InputError
        Not a vector, a length different from ``names``, a non-finite value,
        or two consecutive slices whose positions do not increase.
    """
    z = np.asarray(zpos, dtype=np.float64)
    if z.ndim != 1:
        raise InputError(f"z positions must be a vector (one per slice), got an array of shape {z.shape}.")
    if names is not None and len(names) != len(z):
        raise InputError(f"{len(z)} z positions for {len(names)} files.")

    def label(k: int) -> str:
        return repr(str(names[k])) if names is not None else f"slice {first_index + k}"

    bad = np.flatnonzero(~np.isfinite(z))
    if bad.size:
        raise InputError(f"{label(bad[0])} has no finite z position (z = {z[bad[0]]}).")
    bad = np.flatnonzero(np.diff(z) <= 0)
    if bad.size:
        k = int(bad[0])
        raise InputError(
            f"z positions must increase strictly in slice order, but {label(k)} (z = {z[k]:g}) "
            f"is followed by {label(k + 1)} (z = {z[k + 1]:g})."
        )
    return z
