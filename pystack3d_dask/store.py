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

Integrity (format 2): every chunk ends with a CRC32C of its bytes (Zarr v3's
``crc32c`` codec, last in the pipeline), and every chunk is written, even when
it equals the fill value, so a missing chunk file is a loss, never "zeros".
:meth:`ProjectStore.damage` checks cheaply (file listing and sizes) that an
array is whole before it is used; :meth:`ProjectStore.verify_array` reads every
chunk through its checksum.  Stores of format 1 (no checksums) open and run;
only missing chunks are found in them, and arrays written later get checksums.

A step's new result is written beside the old one, in the group
``<step>~new``, and swapped in by two directory renames once complete
(:meth:`ProjectStore.commit`); readers see the old result until then.

A :class:`ProjectStore` keeps the step attributes it has read (a run asks for
them hundreds of times); each of its methods that writes, renames or deletes a
group forgets them all.  One instance serves one run, under the run lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pystack3d_dask.checksum import PooledCrc32cCodec
from pystack3d_dask.errors import DamagedError, DiskFullError, StoreError
from pystack3d_dask.kernels.dtype import clip_cast, slice_stats
from pystack3d_dask.lazy import lazy_module

da = lazy_module("dask.array")

STORE_NAME = "pystack3d_dask.zarr"
LOCK_NAME = ".pystack3d_dask.lock"
FORMAT_VERSION = 2
INPUT = "input"
#: suffixes of a step's group being written (``~new``) and of the old one during the swap (``~old``)
NEW, OLD = "~new", "~old"
#: columns of the per-slice statistics array
STATS_COLUMNS = ("raw_min", "raw_max", "raw_mean", "min", "max", "mean", "done")
#: chunk compression choices.  Off by default: real FIB-SEM slices are noisy and compress
#: by 1.1-1.5x only, while compressing costs a third of the ingest throughput; "lz4" (with
#: byte shuffle, for uint16/float32) suits smooth data, "zstd" gives the smallest store.
COMPRESSION = {
    "none": (),
    "lz4": (BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"),),
    "zstd": (BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),),
}
#: last codec of every array: a CRC32C of the chunk's stored bytes (4 bytes per chunk, ~10 GB/s;
#: Zarr's ``crc32c``, encoded without its copy of the chunk into a fresh allocation)
CHECKSUM = (PooledCrc32cCodec(),)
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


def _open_array(store_path: str, node: str, mode: str = "r+") -> zarr.Array:
    # Cached per process (a worker writing many chunks of one array opens it once), keyed on
    # the metadata file's change time too: a step recomputed or swapped in has new arrays.
    try:
        stamp = os.stat(os.path.join(store_path, node, "zarr.json")).st_mtime_ns
    except OSError:
        stamp = None
    return _open_cached(store_path, node, mode, stamp)


@functools.lru_cache(maxsize=64)
def _open_cached(store_path: str, node: str, mode: str, stamp: int | None) -> zarr.Array:
    # The array config is a runtime setting, not stored: give it again on every open.
    return zarr.open_array(store_path, path=node, mode=mode).with_config(ARRAY_CONFIG)


def write_block(raw: np.ndarray, store_path: str, node: str, start: int,
                reduction: Callable[[np.ndarray], np.ndarray] | None = None) -> int:
    """Write one chunk of a step's result and its statistics; the chunk's unit of completion.

    ``raw`` is the step's output for slices ``start:start+len(raw)`` in any
    dtype; it is clipped and cast to the array's dtype and written; then the
    step's ``reduction`` of the written chunk (if any), and last the per-slice
    statistics (raw and clipped) with their ``done`` flags.
    Returns the number of slices written (for progress).

    Raises
    ------
    StoreError
        The disk is full or not writable (naming the folder and the space needed).
    """
    arr = _open_array(store_path, node)
    out = clip_cast(raw, arr.dtype)
    stop = start + out.shape[0]
    try:
        arr[start:stop] = out
        if reduction is not None:
            _open_array(store_path, extra_node(node))[start:stop] = reduction(out)
        raw_stats = slice_stats(raw)
        out_stats = raw_stats if out is raw else slice_stats(out)  # no cast (e.g. ingest): one pass
        table = np.column_stack([raw_stats, out_stats, np.ones(out.shape[0])])
        _open_array(store_path, stats_node(node))[start:stop] = table
    except OSError as exc:
        raise write_error(exc, Path(store_path), out.nbytes, "a chunk") from None
    return out.shape[0]


def write_error(exc: OSError, folder: Path, nbytes: int, what: str = "this chunk") -> StoreError:
    """A one-line :class:`StoreError` for a failed write (disk full: the folder and the space needed)."""
    if isinstance(exc, DiskFullError) or exc.errno == errno.ENOSPC:
        return DiskFullError(f"the disk holding {folder} is full: {what} needs {_mib(nbytes)}; free some space "
                          "and run again to resume.")
    return StoreError(f"cannot write in {folder}: {exc.strerror or exc}.")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**17 else f"{nbytes / 2**10:.1f} KiB"


class StoredArray:
    """A stored array as dask reads it: every chunk through its checksum, a failure naming the chunk.

    Picklable (it holds the store path and the node name only), so workers of a
    cluster open the array themselves.
    """

    def __init__(self, store_path: str, node: str):
        self.store_path, self.node = store_path, node
        arr = _open_array(store_path, node, "r")
        self.shape, self.dtype, self.chunks = arr.shape, arr.dtype, arr.chunks
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        try:
            return _open_array(self.store_path, self.node, "r")[key]
        except Exception as exc:  # a checksum, decoding or file error: the chunk is damaged
            first = key[0] if isinstance(key, tuple) and key else key
            if isinstance(first, slice):
                start, where = first.start or 0, f"slices {first.start or 0}:{first.stop}"
            else:
                start, where = (first, f"slice {first}") if isinstance(first, int) else (0, "data")
            raise DamagedError(f"{self.node} {where} in {self.store_path} cannot be read ({exc}): the store is "
                               "damaged; `pystack3d-dask verify` names what, and `run` recomputes it.",
                               self.node, start, str(exc)) from None


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
            meta = self.meta
            foreign = not meta and any(True for _ in self.root.members())
        except (OSError, ValueError, TypeError) as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}") from None
        if foreign:
            raise StoreError(f"{self.path} is a Zarr store not written by pystack3d-dask: move it away or "
                             "give another --output folder.")
        self._attrs: dict[str, dict | None] = {}  # step -> attributes read (see info)
        if meta.get("format", 1) > FORMAT_VERSION:
            raise StoreError(f"{self.path} was written by a newer pystack3d-dask (store format "
                             f"{meta['format']}, this version reads up to {FORMAT_VERSION}): upgrade it.")

    # -- project-wide attributes ----------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return dict(self.root.attrs.get("pystack3d_dask", {}))

    def set_meta(self, **values: Any) -> None:
        self._changed()
        self.root.attrs["pystack3d_dask"] = {**self.meta, "format": FORMAT_VERSION, **values}

    # -- steps ---------------------------------------------------------------------------------------
    def steps(self) -> list[str]:
        """Names of the step groups present (in no particular order), without those being written."""
        return sorted(name for name, _ in self.root.groups() if not name.endswith((NEW, OLD)))

    def info(self, step: str) -> dict | None:
        """The step's attributes, or None if the step was never started.

        Read once, then kept until this store changes a group (a copy of the top
        level is returned: treat the nested values as read-only).
        """
        if step not in self._attrs:
            self._attrs[step] = self._read_attrs(step)
        found = self._attrs[step]
        return None if found is None else dict(found)

    def _read_attrs(self, step: str) -> dict | None:
        # The group's zarr.json read directly: a tenth of the time of zarr's own open
        try:
            meta = json.loads((self.path / step / "zarr.json").read_bytes())
            attrs = meta.get("attributes", {})
            if meta.get("node_type") != "group" or not isinstance(attrs, dict):
                raise ValueError("not the metadata of a group")
            return attrs
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError, AttributeError) as exc:
            raise StoreError(f"the metadata of step {step!r} in {self.path} cannot be read ({exc}): the store "
                             "is damaged; `pystack3d-dask verify` names what, and `run` recomputes it.") from None

    def _changed(self) -> None:
        """Forget the attributes read: a group was written, renamed or deleted."""
        self._attrs.clear()
        _open_cached.cache_clear()

    def set_info(self, step: str, **values: Any) -> None:
        self._changed()
        group = self.root.require_group(step)
        group.attrs.update(values)

    def delete(self, step: str) -> None:
        """Remove a step's group (result, statistics, state)."""
        self._changed()
        shutil.rmtree(self.path / step, ignore_errors=True)

    def discard(self, step: str, channel_keys: list[str]) -> None:
        """Delete a step's images, keeping its statistics, state and attributes."""
        self._changed()
        group = self.root[step]
        for key in channel_keys:
            if key in group:
                del group[key]
        group.attrs["discarded"] = True

    # -- a step written beside the old one, then swapped in -------------------------------------------
    def begin(self, step: str, chain: str, *, fresh: bool = False) -> str:
        """Name of the group to write ``step``'s result with hash ``chain`` into.

        The step's own group when it holds an unfinished result with this hash
        (chunks found damaged, or a store of format 1) and not ``fresh``, else
        ``<step>~new``: resumed when a killed run left it with this hash, started
        afresh otherwise.
        """
        info = self.info(step) or {}
        if not fresh and info.get("hash") == chain and not info.get("complete"):
            return step
        target = step + NEW
        if (self.info(target) or {}).get("hash") != chain:
            self.delete(target)
        return target

    def commit(self, step: str, target: str) -> None:
        """Make the complete result in ``target`` (see :meth:`begin`) the step's result."""
        if target == step:
            return
        self._changed()
        final, old = self.path / step, self.path / (step + OLD)
        if final.exists():
            os.replace(final, old)
        os.replace(self.path / target, final)  # the swap: one rename
        shutil.rmtree(old, ignore_errors=True)

    def abort(self, step: str) -> None:
        """Remove the result being written for ``step`` (the old one stays)."""
        self.delete(step + NEW)

    def recover(self) -> None:
        """Finish a swap that a killed run left half done, remove the files it was writing.

        Under the run lock only: a reader (``info``, ``export``) must not delete a running
        writer's files in flight.
        """
        self._changed()
        for partial in self.path.rglob("*.partial"):  # zarr's temporary file of a killed write
            partial.unlink(missing_ok=True)
        for old in self.path.glob(f"*{OLD}"):
            final = self.path / old.name[: -len(OLD)]
            new = self.path / (final.name + NEW)
            if not final.exists():
                os.replace(new if new.exists() else old, final)
            shutil.rmtree(old, ignore_errors=True)

    def node(self, step: str, channel: str) -> str:
        """Name of the result array of ``step`` for ``channel`` (following aliases)."""
        info = self.info(step) or {}
        return f"{info.get('alias') or step}/{channel_key(channel)}"

    def create_result(self, step: str, channel: str, shape: tuple[int, ...], cz: int, dtype: Any,
                      extra: tuple[int, Any] | None = None) -> str:
        """Create (or reuse, if identical) the result and statistics arrays; return the node name.

        ``extra = (width, dtype)`` also creates the ``(z, width)`` array of a write-pass reduction.
        """
        self._changed()
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
        group.create_array(key, shape=tuple(shape), chunks=chunks, dtype=dtype,
                           compressors=self.compressors + CHECKSUM, fill_value=0, config=ARRAY_CONFIG)
        group.require_group("_stats").create_array(
            key, shape=(shape[0], len(STATS_COLUMNS)), chunks=(cz, len(STATS_COLUMNS)), dtype="f8",
            fill_value=np.nan, compressors=CHECKSUM, config=ARRAY_CONFIG,
        )
        if extra is not None:
            group.require_group("_extra").create_array(
                key, shape=(shape[0], extra[0]), chunks=(cz, extra[0]), dtype=extra[1], fill_value=0,
                compressors=self.compressors + CHECKSUM, config=ARRAY_CONFIG)
        return node

    # -- reading -------------------------------------------------------------------------------------
    def array(self, node: str) -> zarr.Array:
        return self.root[node]

    def lazy(self, node: str) -> da.Array:
        """``node`` as a dask array of its chunks, each read through its checksum."""
        src = StoredArray(str(self.path), node)
        return da.from_array(src, chunks=src.chunks, lock=False, meta=np.empty((0,) * src.ndim, src.dtype))

    def read(self, node: str, start: int, stop: int) -> np.ndarray:
        """Slices ``start:stop`` of ``node``, read through their checksums."""
        return StoredArray(str(self.path), node)[start:stop]

    def stats(self, node: str) -> np.ndarray:
        """The ``(z, 7)`` statistics table of a result array (NaN rows not yet computed)."""
        return StoredArray(str(self.path), stats_node(node))[:]

    def extra(self, node: str) -> np.ndarray | None:
        """The write-pass reduction table of a result array, if its step has one."""
        if not (self.path / extra_node(node) / "zarr.json").exists():
            return None
        return StoredArray(str(self.path), extra_node(node))[:]

    def done_chunks(self, node: str) -> np.ndarray:
        """Boolean per z chunk of ``node``: True when the chunk is written."""
        arr = self.root[node]
        done = self.stats(node)[:, -1] == 1
        cz = arr.chunks[0]
        return np.array([done[i : i + cz].all() for i in range(0, arr.shape[0], cz)], bool)

    # -- integrity -----------------------------------------------------------------------------------
    def _arrays_of(self, node: str, images: bool) -> list[str]:
        """The arrays holding ``node``'s result: its images (unless discarded) and its tables."""
        names = ([node] if images else []) + [stats_node(node)]
        if (self.path / extra_node(node)).exists():
            names.append(extra_node(node))
        return names

    def damage(self, node: str, *, images: bool = True) -> dict[int | None, str]:
        """Cheap check that ``node`` and its tables are whole: chunk files listed and sized.

        Returns ``{z chunk index: what is wrong}``; the key ``None`` when an
        array's metadata is unreadable (the whole step must be recomputed).
        ``images=False`` checks the tables only (images discarded by ``keep='last'``).
        """
        bad: dict[int | None, str] = {}
        for name in self._arrays_of(node, images):
            try:
                arr = zarr.open_array(self.path, path=name, mode="r")
            except Exception as exc:
                bad[None] = f"{name}: metadata unreadable ({exc})"
                continue
            bytes_codecs = arr.metadata.codecs[1:]  # codecs[0] turns the array into bytes
            size = None  # unknown when compressed
            if all(isinstance(c, Crc32cCodec) for c in bytes_codecs):
                size = int(np.prod(arr.chunks)) * arr.dtype.itemsize + 4 * len(bytes_codecs)
            encode = arr.metadata.chunk_key_encoding.encode_chunk_key
            for idx in np.ndindex(*arr.cdata_shape):
                try:
                    found = os.stat(self.path / name / encode(idx)).st_size
                except FileNotFoundError:
                    bad.setdefault(idx[0], f"{name} chunk {idx[0]}: missing")
                    continue
                if size is not None and found != size:
                    bad.setdefault(idx[0], f"{name} chunk {idx[0]}: {found} bytes, expected {size}")
        return bad

    def has_checksums(self, node: str) -> bool:
        """True when the chunks of ``node`` end with a checksum (arrays of format 1 do not)."""
        return any(isinstance(c, Crc32cCodec) for c in self.root[node].metadata.codecs)

    def verify_array(self, node: str, *, images: bool = True, workers: int = 1) -> dict[int | None, str]:
        """:meth:`damage`, then every chunk of ``node`` and its tables read through its checksum."""
        bad = self.damage(node, images=images)
        if None in bad:
            return bad
        names = self._arrays_of(node, images)

        def read(name: str, i: int) -> tuple[int, str] | None:
            src = StoredArray(str(self.path), name)
            cz = src.chunks[0]
            try:
                src[i * cz : (i + 1) * cz]
            except DamagedError as exc:
                return i, f"{name} chunk {i}: {exc.reason}"
            return None

        nz = self.root[stats_node(node)].cdata_shape[0]
        with ThreadPoolExecutor(workers) as pool:
            found = pool.map(lambda job: read(*job), [(n, i) for n in names for i in range(nz) if i not in bad])
            for hit in found:
                if hit is not None:
                    bad.setdefault(*hit)
        done = self.done_chunks(node) if images else None
        if done is not None:
            for i in np.flatnonzero(~done):
                bad.setdefault(int(i), f"{stats_node(node)} chunk {i}: not marked done")
        return bad

    def record_damage(self, exc: DamagedError) -> None:
        """Mark what ``exc`` found damaged as undone, for the next run to recompute it."""
        parts = exc.node.split("/")
        if parts[0].endswith((NEW, OLD)):
            return  # a result being written: its own run rewrites it
        if len(parts) > 2 and parts[1] == "_state":
            self.delete_state(parts[0], parts[2])
            return
        node = f"{parts[0]}/{parts[-1]}"
        self.mark_undone(parts[0], node, [exc.start // self.root[stats_node(node)].chunks[0]])

    def mark_undone(self, step: str, node: str, chunks: Iterable[int]) -> None:
        """Record damaged z chunks of ``node``: their done flags cleared, ``step`` incomplete."""
        table = self.root[stats_node(node)].with_config(ARRAY_CONFIG)
        cz = table.chunks[0]
        for i in chunks:
            rows = min(cz, table.shape[0] - i * cz)
            table[i * cz : i * cz + rows] = np.full((rows, table.shape[1]), np.nan)  # rewrites a bad chunk too
        self.set_info(step, complete=False)

    # -- state ----------------------------------------------------------------------------------
    def save_state(self, step: str, key: str, state: dict) -> None:
        """Persist a step's global state: arrays as Zarr arrays, other values as attributes."""
        self._changed()
        group = self.root.require_group(step).require_group("_state")
        if key in group:
            del group[key]
        sub = group.create_group(key)
        values = {}
        for name, value in state.items():
            if isinstance(value, np.ndarray):
                a = sub.create_array(name, shape=value.shape, dtype=value.dtype,
                                     chunks=tuple(max(1, s) for s in value.shape), compressors=CHECKSUM)
                a[...] = value
            else:
                values[name] = _jsonable(value)
        sub.attrs["values"] = values

    def state_keys(self, step: str) -> list[str]:
        """Keys of the states saved for ``step``."""
        try:
            return sorted(name for name, _ in self.root[f"{step}/_state"].groups())
        except KeyError:
            return []

    def delete_state(self, step: str, key: str) -> None:
        """Remove a damaged state; the step becomes incomplete, so a run computes it again."""
        shutil.rmtree(self.path / step / "_state" / key, ignore_errors=True)
        self.set_info(step, complete=False)

    def load_state(self, step: str, key: str) -> dict | None:
        """A saved state, or None."""
        try:
            sub = self.root[f"{step}/_state/{key}"]
        except KeyError:
            return None
        state = dict(sub.attrs.get("values", {}))
        for name, _ in sub.arrays():
            state[name] = StoredArray(str(self.path), f"{step}/_state/{key}/{name}")[...]
        return state


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value
