"""The project store: one Zarr v3 group holding every step's result, statistics and state.

Layout (``<output>/pystack3d_dask.zarr``)::

    /                       attrs["pystack3d_dask"]: format version, channels, input fingerprint
    /<step>/                attrs: hash, params, complete, zpos (output z positions),
                            alias (name of the step whose array is this step's result, when
                            the step leaves the images unchanged)
    /<step>/<channel>       the result, (z, y, x) in the stack dtype, chunks (cz, Y, X)
    /<step>/_stats/<channel>  float64 (z, 7): raw min, max, mean; clipped min, max, mean; done
    /<step>/_extra/<channel>  (z, m): a per-slice table computed in the write pass, for steps
                            that declare one (e.g. the histograms after intensity_rescaling)
    /<step>/_state/<key>    the step's global state: arrays, and JSON values in the attrs

``<step>`` is ``input`` for the ingested TIFFs.  ``<channel>`` is the channel
folder name, ``_`` for ``"."``.

Completion is tracked per chunk: the task that owns a chunk writes its data,
then its rows of the statistics array with ``done = 1``.  Zarr's local store
writes every chunk atomically (temporary file then rename), so a chunk whose
``done`` flag is set is whole, and a run killed at any moment restarts on the
chunks whose flag is missing.  The step is marked ``complete`` only when every
flag is set.  A second run on the same store is refused through an OS lock
(``fcntl.flock``) that dies with its process, so a killed run never leaves a
stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pystack3d_dask.errors import StoreError
from pystack3d_dask.kernels.dtype import clip_cast, slice_stats

STORE_NAME = "pystack3d_dask.zarr"
LOCK_NAME = ".pystack3d_dask.lock"
FORMAT_VERSION = 1
INPUT = "input"
#: columns of the per-slice statistics array
STATS_COLUMNS = ("raw_min", "raw_max", "raw_mean", "min", "max", "mean", "done")
#: chunk compression choices.  Off by default: real FIB-SEM slices are noisy and compress
#: by 1.1-1.5x only, while compressing costs a third of the ingest throughput; "lz4" (with
#: byte shuffle, for uint16/float32) suits smooth data, "zstd" gives the smallest store.
COMPRESSION = {
    "none": None,
    "lz4": (BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"),),
    "zstd": (BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),),
}
#: write every chunk: zarr's default compares each chunk with the fill value first, which costs
#: more than the write itself here, and an all-zero chunk (an empty border) is still a result
ARRAY_CONFIG = {"write_empty_chunks": True}


def channel_key(channel: str) -> str:
    """Zarr node name of a channel (``"."``, the project folder itself, is ``"_"``)."""
    return "_" if channel == "." else channel.replace("/", "_")


@contextlib.contextmanager
def project_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` for one run; refuse if another run holds it."""
    path = folder / LOCK_NAME
    try:
        fh = open(path, "a+")
    except OSError as exc:
        raise StoreError(f"cannot write in {folder}: {exc}") from None
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise StoreError(
                f"another pystack3d-dask run ({holder}) is working on {folder}; "
                "wait for it to finish (or stop it) and run again."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        fh.close()


def check_writable(folder: Path) -> None:
    """Raise :class:`StoreError` naming ``folder`` unless files can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".pystack3d_dask_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StoreError(f"the output folder {folder} is not writable: {exc.strerror or exc}.") from None


@functools.lru_cache(maxsize=64)
def _open_array(store_path: str, node: str) -> zarr.Array:
    # Cached per process: a worker writing many chunks of one array opens it once.  The
    # array config is a runtime setting, not stored: give it again on every open.
    return zarr.open_array(store_path, path=node, mode="r+").with_config(ARRAY_CONFIG)


def write_block(raw: np.ndarray, store_path: str, node: str, start: int,
                reduction: Callable[[np.ndarray], np.ndarray] | None = None) -> int:
    """Write one chunk of a step's result and its statistics; the chunk's unit of completion.

    ``raw`` is the step's output for slices ``start:start+len(raw)`` in any
    dtype; it is clipped and cast to the array's dtype and written; then the
    step's ``reduction`` of the written chunk (if any), and last the per-slice
    statistics (raw and clipped) with their ``done`` flags.
    Returns the number of slices written (for progress).
    """
    arr = _open_array(store_path, node)
    out = clip_cast(raw, arr.dtype)
    stop = start + out.shape[0]
    arr[start:stop] = out
    if reduction is not None:
        _open_array(store_path, extra_node(node))[start:stop] = reduction(out)
    raw_stats = slice_stats(raw)
    out_stats = raw_stats if out is raw else slice_stats(out)  # no cast (e.g. ingest): one pass
    table = np.column_stack([raw_stats, out_stats, np.ones(out.shape[0])])
    _open_array(store_path, stats_node(node))[start:stop] = table
    return out.shape[0]


def stats_node(node: str) -> str:
    """Statistics array of the result array ``<step>/<channel>``."""
    step, channel = node.split("/")
    return f"{step}/_stats/{channel}"


def extra_node(node: str) -> str:
    """Write-pass reduction array (e.g. histograms after) of the result array ``<step>/<channel>``."""
    step, channel = node.split("/")
    return f"{step}/_extra/{channel}"


class ProjectStore:
    """Read/write access to a project's Zarr group; knows the layout, not the algorithms."""

    def __init__(self, path: str | os.PathLike, *, compression: str = "none"):
        self.path = Path(path)
        self.compressors = COMPRESSION[compression]
        try:
            self.root = zarr.open_group(self.path, mode="a", zarr_format=3)
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}") from None
        for partial in self.path.rglob("*.partial"):  # left by a write killed mid-file
            partial.unlink(missing_ok=True)

    # -- project-wide attributes ----------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return dict(self.root.attrs.get("pystack3d_dask", {}))

    def set_meta(self, **values: Any) -> None:
        self.root.attrs["pystack3d_dask"] = {**self.meta, "format": FORMAT_VERSION, **values}

    # -- steps ---------------------------------------------------------------------------------------
    def steps(self) -> list[str]:
        """Names of the step groups present (in no particular order)."""
        return sorted(name for name, _ in self.root.groups())

    def info(self, step: str) -> dict | None:
        """The step's attributes, or None if the step was never started."""
        if step not in self.root:
            return None
        return dict(self.root[step].attrs)

    def set_info(self, step: str, **values: Any) -> None:
        group = self.root.require_group(step)
        group.attrs.update(values)

    def delete(self, step: str) -> None:
        """Remove a step's group (result, statistics, state)."""
        if step in self.root:
            shutil.rmtree(self.path / step, ignore_errors=False)
        _open_array.cache_clear()

    def discard(self, step: str, channel_keys: list[str]) -> None:
        """Delete a step's images, keeping its statistics, state and attributes."""
        group = self.root[step]
        for key in channel_keys:
            if key in group:
                del group[key]
        group.attrs["discarded"] = True
        _open_array.cache_clear()

    def node(self, step: str, channel: str) -> str:
        """Name of the result array of ``step`` for ``channel`` (following aliases)."""
        info = self.info(step) or {}
        return f"{info.get('alias') or step}/{channel_key(channel)}"

    def create_result(self, step: str, channel: str, shape: tuple[int, ...], cz: int, dtype: Any,
                      extra: tuple[int, Any] | None = None) -> str:
        """Create (or reuse, if identical) the result and statistics arrays; return the node name.

        ``extra = (width, dtype)`` also creates the ``(z, width)`` array of a write-pass reduction.
        """
        node = f"{step}/{channel_key(channel)}"
        group = self.root.require_group(step)
        key = channel_key(channel)
        chunks = (cz,) + tuple(shape[1:])
        if key in group:
            arr = group[key]
            if arr.shape == tuple(shape) and arr.chunks == chunks and arr.dtype == np.dtype(dtype):
                return node
            del group[key]
            for sub in ("_stats", "_extra"):
                if sub in group and key in group[sub]:
                    del group[sub][key]
        group.create_array(key, shape=tuple(shape), chunks=chunks, dtype=dtype, compressors=self.compressors,
                           fill_value=0, config=ARRAY_CONFIG)
        group.require_group("_stats").create_array(
            key, shape=(shape[0], len(STATS_COLUMNS)), chunks=(cz, len(STATS_COLUMNS)), dtype="f8",
            fill_value=np.nan, compressors=None, config=ARRAY_CONFIG,
        )
        if extra is not None:
            group.require_group("_extra").create_array(
                key, shape=(shape[0], extra[0]), chunks=(cz, extra[0]), dtype=extra[1], fill_value=0,
                compressors=self.compressors, config=ARRAY_CONFIG)
        _open_array.cache_clear()
        return node

    def array(self, node: str) -> zarr.Array:
        return self.root[node]

    def stats(self, node: str) -> np.ndarray:
        """The ``(z, 7)`` statistics table of a result array (NaN rows not yet computed)."""
        return self.root[stats_node(node)][:]

    def extra(self, node: str) -> np.ndarray | None:
        """The write-pass reduction table of a result array, if its step has one."""
        try:
            return self.root[extra_node(node)][:]
        except KeyError:
            return None

    def done_chunks(self, node: str) -> np.ndarray:
        """Boolean per z chunk of ``node``: True when the chunk is written."""
        arr = self.root[node]
        done = self.stats(node)[:, -1] == 1
        cz = arr.chunks[0]
        return np.array([done[i : i + cz].all() for i in range(0, arr.shape[0], cz)], bool)

    # -- state ----------------------------------------------------------------------------------
    def save_state(self, step: str, key: str, state: dict) -> None:
        """Persist a step's global state: arrays as Zarr arrays, other values as attributes."""
        group = self.root.require_group(step).require_group("_state")
        if key in group:
            del group[key]
        sub = group.create_group(key)
        values = {}
        for name, value in state.items():
            if isinstance(value, np.ndarray):
                a = sub.create_array(name, shape=value.shape, dtype=value.dtype,
                                     chunks=tuple(max(1, s) for s in value.shape), compressors=None)
                a[...] = value
            else:
                values[name] = _jsonable(value)
        sub.attrs["values"] = values

    def load_state(self, step: str, key: str) -> dict | None:
        """A saved state, or None."""
        try:
            sub = self.root[f"{step}/_state/{key}"]
        except KeyError:
            return None
        state = dict(sub.attrs.get("values", {}))
        for name, arr in sub.arrays():
            state[name] = arr[...]
        return state


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value
