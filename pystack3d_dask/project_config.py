"""The whole parameter file: top-level keys, the ``[cluster]`` table and every step table.

Everything is checked here, before any work: unknown keys and tables, unknown
or repeated steps, wrong types and out-of-range values (see
:mod:`pystack3d_dask.config` for the rules).  A PyStack3D ``params.toml`` loads
unchanged, older key names ``dirname`` / ``input_dirname`` included.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from pystack3d_dask.cluster import ClusterConfig
from pystack3d_dask.config import build_params, check, coerce, fail, read_toml, suggest
from pystack3d_dask.errors import ConfigError
from pystack3d_dask.io.metadata import MetadataConfig
from pystack3d_dask.steps import STEP_NAMES, get_step

#: top-level keys and their types; the older names of project_dir are accepted too
TOP_KEYS: dict[str, Any] = {
    "project_dir": str,
    "ind_min": int,
    "ind_max": int,
    "channels": tuple[str, ...],
    "nproc": int,
    "process_steps": tuple[str, ...],
    "history": tuple[str, ...],
}
PROJECT_DIR_ALIASES = ("dirname", "input_dirname")
TABLES = ("cluster", "metadata") + STEP_NAMES


@dataclasses.dataclass(frozen=True)
class ProjectConfig:
    """A validated parameter file."""

    #: folder holding the input TIFFs
    project_dir: Path
    #: steps to run, in order
    process_steps: tuple[str, ...]
    #: parameters of every step table present (and of every step to run)
    step_params: Mapping[str, Any]
    ind_min: int = 0
    #: last slice kept (inclusive); None = to the end
    ind_max: int | None = None
    channels: tuple[str, ...] = (".",)
    nproc: int = 1
    #: steps already done: the run starts after them
    history: tuple[str, ...] = ()
    cluster: ClusterConfig = ClusterConfig()
    #: physical sizes the files lack, and the source of the z positions (the [metadata] table)
    metadata: MetadataConfig = MetadataConfig()
    #: the parameter file, when there is one
    toml_path: Path | None = None

    @property
    def steps_to_run(self) -> tuple[str, ...]:
        return self.process_steps[len(self.history):]


def load_config(source: str | os.PathLike | Mapping[str, Any]) -> ProjectConfig:
    """Load and check a parameter file (a path to it, its folder, or an already-parsed table).

    Raises
    ------
    ConfigError
        Naming the key, the value and what is allowed.
    """
    if isinstance(source, Mapping):
        toml_path, table = None, dict(source)
        base = Path.cwd()
    else:
        toml_path, table = read_toml(source)
        base = toml_path.parent
    table = dict(table)
    where = f"{toml_path}: " if toml_path else ""
    try:
        _check_finite(table, "")
        return _build(table, base, toml_path)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None


def _check_finite(value: Any, key: str, section: str = "") -> None:
    """Reject NaN and infinities anywhere in the file (TOML writes them ``nan``, ``inf``)."""
    if isinstance(value, float) and not math.isfinite(value):
        fail(section, key, value, "expected a finite number")
    if isinstance(value, Mapping):
        for name, item in value.items():
            if not key and not section and isinstance(item, Mapping):
                _check_finite(item, "", name)  # a table
            else:
                _check_finite(item, f"{key}.{name}" if key else name, section)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{key}[{i}]", section)


def _check_channel(channel: str) -> None:
    """A channel is a folder inside the project folder: no absolute path, no ``..``."""
    path = PurePosixPath(channel)
    check(not path.is_absolute() and ".." not in path.parts and channel.strip() != "", "", "channels", channel,
          "expected a sub-folder of the project folder (no absolute path, no '..')")


def _build(table: dict, base: Path, toml_path: Path | None) -> ProjectConfig:
    given = [k for k in ("project_dir",) + PROJECT_DIR_ALIASES if k in table]
    if len(given) > 1:
        raise ConfigError(f"give the input folder once: {', '.join(given)} are the same key.")
    if given:
        table["project_dir"] = table.pop(given[0])
    for key, value in table.items():
        if isinstance(value, dict) and key not in TOP_KEYS:
            if key not in TABLES:
                raise ConfigError(f"unknown table [{key}]{suggest(key, TABLES)}; allowed: {', '.join(TABLES)}.")
        elif key not in TOP_KEYS:
            allowed = list(TOP_KEYS) + list(PROJECT_DIR_ALIASES)
            raise ConfigError(f"unknown key {key!r}{suggest(key, allowed)}; allowed top-level keys: "
                              f"{', '.join(allowed)} and the step tables.")
    top = {k: coerce(table[k], tp, section="", key=k) for k, tp in TOP_KEYS.items() if k in table}
    if "process_steps" not in top or not top["process_steps"]:
        raise ConfigError("process_steps is required: the ordered list of steps to run, "
                          f"among {', '.join(STEP_NAMES)}.")
    steps = top["process_steps"]
    seen = set()
    for name in steps:
        check(name in STEP_NAMES, "", "process_steps", name,
              f"unknown step{suggest(name, STEP_NAMES)}; steps: {', '.join(STEP_NAMES)}")
        check(name not in seen, "", "process_steps", name, "a step may appear only once")
        seen.add(name)
    for i, name in enumerate(steps):
        for needed in get_step(name).requires:
            check(needed in steps[:i], "", "process_steps", list(steps),
                  f"{name!r} needs {needed!r} earlier in the list (it uses its result)")
    history = top.get("history", ())
    check(history == steps[: len(history)], "", "history", list(history),
          f"expected the first steps of process_steps, in order ({list(steps)})")
    ind_min = top.get("ind_min", 0)
    check(ind_min >= 0, "", "ind_min", ind_min, "expected an integer >= 0")
    ind_max = top.get("ind_max")
    check(ind_max is None or ind_max >= ind_min, "", "ind_max", ind_max, f"expected >= ind_min ({ind_min})")
    channels = top.get("channels", (".",))
    check(len(channels) > 0 and len(set(channels)) == len(channels), "", "channels", list(channels),
          "expected a non-empty list of distinct sub-folder names")
    for channel in channels:
        _check_channel(channel)
    nproc = top.get("nproc", 1)
    check(nproc >= 1, "", "nproc", nproc, "expected an integer >= 1")
    nproc = _cap_nproc(nproc)
    project_dir = Path(top.get("project_dir", base)).expanduser()
    if not project_dir.is_absolute():
        project_dir = base / project_dir
    step_params = {}
    for name in STEP_NAMES:
        if name in table or name in steps:
            try:
                step = get_step(name)
            except ModuleNotFoundError:
                if name in steps:
                    raise ConfigError(f"step {name!r} is not available in this version.") from None
                continue
            step_params[name] = build_params(step.Params, table.get(name), section=name)
    cluster = build_params(ClusterConfig, table.get("cluster"), section="cluster")
    metadata = build_params(MetadataConfig, table.get("metadata"), section="metadata")
    return ProjectConfig(
        project_dir=project_dir, process_steps=steps, step_params=step_params, ind_min=ind_min,
        ind_max=ind_max, channels=channels, nproc=nproc, history=history, cluster=cluster,
        metadata=metadata, toml_path=toml_path,
    )


def _cap_nproc(nproc: int) -> int:
    """``nproc``, at most the cores this process may use (more only oversubscribes them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if nproc > cores:
        warnings.warn(f"nproc = {nproc} is more than the {cores} cores of this machine: using {cores}.",
                      stacklevel=3)
        return cores
    return nproc
