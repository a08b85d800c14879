"""The project store: one Zarr v3 group holding every step's result, statistics and state.

Layout (``<output>/pystack3d_dask.zarr``)::

    /                       attrs["pystack3d_dask"]: format version, channels, input fingerprint
    /<step>/                attrs: hash, params, complete, zpos (output z positions),
                            alias (name of the step whose array is this step's result, when
                            the step leaves the images unchanged)
    /<step>/<channel>       the result, (z, y, x) in the stack dtype: chunks (cz, Y, X) of whole
                            slices, grouped in shards of k chunks (sz = k * cz slices, one file)
    /<step>/_stats/<channel>  float64 (z, 7): raw min, max, mean; clipped min, max, mean; done
    /<step>/_extra/<channel>  (z, m): a per-slice table computed in the write pass, for steps
                            that declare one (e.g. the histograms after intensity_rescaling)
    /<step>/_views/<channel>  float32 (z, x + y + 1): the centre row and column and the stripe
                            power of every slice, computed in the write pass for the report
                            (:func:`pystack3d_dask.kernels.views.view_lines`); results begun
                            before it existed have none, and the report reads their images
    /<step>/_state/<key>    the step's global state: arrays, and JSON values in the attrs

``<step>`` is ``input`` for the ingested TIFFs.  ``<channel>`` is the channel
folder name, ``_`` for ``"."``.

The *write unit* of a result is its shard (format 3), or its chunk in an
unsharded array (formats 1 and 2): one task writes one unit whole, from the
step's chunks, and the tables ``_stats``, ``_extra`` and ``_views`` are chunked
by the unit, so the task owns every file it writes and never reads one back.  A
result holds one image file and one statistics file per unit: a shard of a
few hundred MiB instead of a chunk of 32 MiB divides the file count of a step
by the chunks per shard (``Project(shard_mib=...)``).  Reads go by chunk.

Completion is tracked per unit: the task that owns a unit writes its data,
then its rows of the statistics array with ``done = 1``.  Every file is
written atomically (temporary file then rename: Zarr's local store, and
:func:`write_shard` for the shards), so a unit whose
``done`` flag is set is whole, and a run killed at any moment restarts on the
units whose flag is missing.  The step is marked ``complete`` only when every
flag is set.  A second run on the same store is refused through an OS lock
(``fcntl.flock``) that dies with its process, so a killed run never leaves a
stale lock.

Integrity (format 2 on): every chunk ends with a CRC32C of its bytes (Zarr v3's
``crc32c`` codec, last in the pipeline; inside a shard, each chunk has its own
and the shard's index has one too), and every chunk is written, even when it
equals the fill value, so a missing chunk is a loss, never "zeros".
:meth:`ProjectStore.damage` checks cheaply that an array is whole before it is
used: every unit's file is listed and sized (its exact size is known without
compression; with compression a shard's index is read and checked instead);
:meth:`ProjectStore.verify_array` reads every chunk through its checksum.
Stores of format 1 (no checksums) open and run; only missing chunks are found
in them, and arrays written later get checksums.  Stores of formats 1 and 2
keep their unsharded layout (it is chosen at ingest, see the engine) until the
input is ingested again.

A step's new result is written beside the old one, in the group
``<step>~new``, and swapped in by two directory renames once complete
(:meth:`ProjectStore.commit`); readers see the old result until then.

A :class:`ProjectStore` keeps the step attributes it has read (a run asks for
them hundreds of times); each of its methods that writes, renames or deletes a
group forgets them all.  One instance serves one run, under the run lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, Endian, ShardingCodec, ShardingCodecIndexLocation

from pystack3d_dask.checksum import PooledCrc32cCodec, crc32c
from pystack3d_dask.errors import DamagedError, DiskFullError, StoreError
from pystack3d_dask.kernels.dtype import clip_cast, slice_stats
from pystack3d_dask.kernels.views import view_lines
from pystack3d_dask.lazy import lazy_module

da = lazy_module("dask.array")

STORE_NAME = "pystack3d_dask.zarr"
LOCK_NAME = ".pystack3d_dask.lock"
FORMAT_VERSION = 3
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


def shard_slices(shape: tuple[int, ...], dtype: Any, cz: int, *, target_mib: float) -> int:
    """Slices per shard: whole chunks of ``cz`` slices, about ``target_mib`` MiB (at least one chunk,
    at most the stack)."""
    chunk_bytes = cz * int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
    k = max(1, int(target_mib * 2**20 // max(chunk_bytes, 1)))
    return cz * min(k, -(-shape[0] // cz))


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


@dataclasses.dataclass
class Block:
    """A chunk of a step's result ready to write: cast to the array's dtype, with its table rows."""

    #: the slices in the array's dtype
    data: np.ndarray
    #: ``(slices, 7)`` statistics rows (see :data:`STATS_COLUMNS`), done flags set
    table: np.ndarray
    #: the step's write-pass reduction of ``data``, or None
    extra: np.ndarray | None
    #: the report's lines of ``data`` (:func:`~pystack3d_dask.kernels.views.view_lines`)
    views: np.ndarray


def prepare_block(raw: np.ndarray, *, dtype: Any, reduction: Callable[[np.ndarray], np.ndarray] | None = None
                  ) -> Block:
    """Clip and cast ``raw`` (a step's output, any dtype) to ``dtype``; its statistics, reduction and lines.

    Done in the task that computed the chunk, so that a write task gathering the
    chunks of a shard holds them in the stored dtype (a float result is up to 8x larger).
    """
    out = clip_cast(raw, np.dtype(dtype))
    raw_stats = slice_stats(raw)
    out_stats = raw_stats if out is raw else slice_stats(out)  # no cast (e.g. ingest): one pass
    table = np.column_stack([raw_stats, out_stats, np.ones(out.shape[0])])
    return Block(out, table, None if reduction is None else reduction(out), view_lines(out))


def write_block(blocks: Sequence[np.ndarray | Block], store_path: str, node: str, start: int,
                reduction: Callable[[np.ndarray], np.ndarray] | None = None) -> int:
    """Write one unit (shard, or chunk of an unsharded array) of a step's result; the unit of completion.

    ``blocks`` are the unit's consecutive chunks from slice ``start`` on: a
    step's raw output (any dtype) or :class:`Block` made by :func:`prepare_block`.
    The unit's data is written, then its write-pass reduction (if any) and its
    lines for the report, and last the per-slice statistics (raw and clipped)
    with their ``done`` flags.
    Returns the number of slices written (for progress).

    Raises
    ------
    StoreError
        The disk is full or not writable (naming the folder and the space needed).
    """
    arr = _open_array(store_path, node)
    parts = [b if isinstance(b, Block) else prepare_block(b, dtype=arr.dtype, reduction=reduction) for b in blocks]
    stop = start + sum(p.data.shape[0] for p in parts)
    try:
        if (encode := _shard_encoder(arr)) is not None:
            path = Path(store_path) / node / arr.metadata.encode_chunk_key((start // arr.shards[0], 0, 0))
            write_shard(path, [p.data for p in parts], chunk=arr.chunks[0], per_shard=arr.shards[0] // arr.chunks[0],
                        fill_value=arr.fill_value, encode=encode)
        else:
            _remove_shards(arr, Path(store_path) / node, start, stop)
            arr[start:stop] = _concat([p.data for p in parts])
        if reduction is not None:
            _open_array(store_path, extra_node(node))[start:stop] = _concat([p.extra for p in parts])
        # a result begun by a version without the table (resumed) goes on without it
        if os.path.exists(os.path.join(store_path, views_node(node), "zarr.json")):
            _open_array(store_path, views_node(node))[start:stop] = _concat([p.views for p in parts])
        _open_array(store_path, stats_node(node))[start:stop] = _concat([p.table for p in parts])
    except OSError as exc:
        nbytes = sum(p.data.nbytes for p in parts)
        raise write_error(exc, Path(store_path), nbytes, "a shard" if arr.shards else "a chunk") from None
    return stop - start


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _shard_encoder(arr: zarr.Array) -> Callable[[np.ndarray], Any] | None:
    """How :func:`write_shard` encodes a chunk of ``arr``'s shards; None when it cannot write them.

    It can when the shards are whole slices of whole-slice chunks, each chunk
    stored raw (little-endian) or Blosc-compressed and followed by its CRC32C,
    with a CRC32C'd index at the end: the layouts this store creates.
    """
    codec = arr.metadata.codecs[0]
    if not isinstance(codec, ShardingCodec) or arr.shards[1:] != arr.shape[1:] or arr.chunks[1:] != arr.shape[1:]:
        return None
    inner = codec.codecs
    if not (_checked_index(codec) and _little_endian(inner[0]) and isinstance(inner[-1], Crc32cCodec)):
        return None
    if len(inner) == 2:
        return memoryview
    if len(inner) == 3 and isinstance(inner[1], BloscCodec):
        return inner[1]._blosc_codec.encode  # numcodecs' Blosc with the array's typesize: Zarr's own bytes
    return None


def _little_endian(codec: Any) -> bool:
    return isinstance(codec, BytesCodec) and codec.endian in (None, Endian.little)


def _checked_index(codec: ShardingCodec) -> bool:
    """True when a shard's index is at its end, little-endian, followed by its CRC32C (as we write it)."""
    index = codec.index_codecs
    return (codec.index_location == ShardingCodecIndexLocation.end and len(index) == 2
            and _little_endian(index[0]) and isinstance(index[1], Crc32cCodec))


def write_shard(path: Path, blocks: Sequence[np.ndarray], *, chunk: int, per_shard: int, fill_value: Any,
                encode: Callable[[np.ndarray], Any] = memoryview) -> None:
    """Write a shard of whole slices as Zarr lays it out, streamed chunk by chunk into its file.

    The shard's chunks of ``chunk`` slices (the last one of the stack padded with
    ``fill_value``, as Zarr pads it), each encoded by ``encode`` (raw bytes by
    default, or a compressor's ``encode``) and followed by the CRC32C of its
    stored bytes, then the index (offset and length of each of the
    ``per_shard`` chunks, ``2**64 - 1`` for those past the stack) and its
    CRC32C; written under a temporary name then renamed, as Zarr's local store
    does.  Zarr writes the same bytes but first gathers the shard twice in
    memory (its chunks encoded, then joined): here one encoded chunk at a time.
    """
    data = _concat(list(blocks)) if any(len(b) != chunk for b in blocks[:-1]) else None
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)] if data is not None else list(blocks)
    index = np.full((per_shard, 2), 2**64 - 1, "<u8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as fh:
            offset = 0
            for i, block in enumerate(chunks):
                if len(block) < chunk:
                    pad = np.full((chunk - len(block),) + block.shape[1:], fill_value, block.dtype)
                    block = np.concatenate([block, pad])
                block = np.ascontiguousarray(block, block.dtype.newbyteorder("<"))
                stored = memoryview(encode(block)).cast("B")
                fh.write(stored)
                fh.write(crc32c(stored))
                index[i] = offset, stored.nbytes + 4
                offset += stored.nbytes + 4
            fh.write(index.tobytes() + crc32c(index))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_shards(arr: zarr.Array, folder: Path, start: int, stop: int) -> None:
    # Zarr merges a write into the shard file already there, even when the write covers the
    # whole shard: it reads it first, fails on a damaged one, and wastes the read on a sound one.
    if arr.shards is None:
        return
    sz = arr.shards[0]
    for i in range(start // sz, -(-stop // sz)):
        (folder / arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))).unlink(missing_ok=True)


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


def views_node(node: str) -> str:
    """The report's lines (:func:`~pystack3d_dask.kernels.views.view_lines`) of the result array ``<step>/<channel>``."""
    step, channel = node.split("/")
    return f"{step}/_views/{channel}"


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
                      extra: tuple[int, Any] | None = None, *, shard: int | None = None) -> str:
        """Create (or reuse, if identical) the result and statistics arrays; return the node name.

        ``shard``: slices per shard (a multiple of ``cz``), or None for an unsharded array
        (one file per chunk, the layout of formats 1 and 2).  ``extra = (width, dtype)``
        also creates the ``(z, width)`` array of a write-pass reduction.  The
        report's lines are created with a new result, not added to one reused.
        """
        if shard is not None and (shard < cz or shard % cz):
            raise ValueError(f"shard = {shard} is invalid: expected a multiple of the chunk's {cz} slices.")
        self._changed()
        node = f"{step}/{channel_key(channel)}"
        group = self.root.require_group(step)
        key = channel_key(channel)
        chunks = (cz,) + tuple(shape[1:])
        shards = None if shard is None else (shard,) + tuple(shape[1:])
        unit = shard or cz
        if key in group:
            arr = group[key]
            if (arr.shape == tuple(shape) and arr.chunks == chunks and arr.shards == shards
                    and arr.dtype == np.dtype(dtype)):
                return node
            del group[key]
            for sub in ("_stats", "_extra", "_views"):
                if sub in group and key in group[sub]:
                    del group[sub][key]
        group.create_array(key, shape=tuple(shape), chunks=chunks, shards=shards, dtype=dtype,
                           compressors=self.compressors + CHECKSUM, fill_value=0, config=ARRAY_CONFIG)
        group.require_group("_stats").create_array(
            key, shape=(shape[0], len(STATS_COLUMNS)), chunks=(unit, len(STATS_COLUMNS)), dtype="f8",
            fill_value=np.nan, compressors=CHECKSUM, config=ARRAY_CONFIG,
        )
        tables = {"_views": (shape[1] + shape[2] + 1, "f4", np.nan)}
        if extra is not None:
            tables["_extra"] = (extra[0], extra[1], 0)
        for sub, (width, kind, fill) in tables.items():
            group.require_group(sub).create_array(
                key, shape=(shape[0], width), chunks=(unit, width), dtype=kind, fill_value=fill,
                compressors=self.compressors + CHECKSUM, config=ARRAY_CONFIG)
        return node

    def shard_slices(self, node: str) -> int | None:
        """Slices per shard of the result array ``node``; None when it is unsharded."""
        shards = self.root[node].shards
        return None if shards is None else shards[0]

    def unit_name(self, node: str) -> str:
        """What a write unit of ``node`` is, for messages: "shard", "chunk" (unsharded), "unit" (images gone)."""
        try:
            return "chunk" if self.shard_slices(node) is None else "shard"
        except KeyError:  # images discarded (keep='last'): the tables remain
            return "unit"

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
        return self._table(extra_node(node))

    def views(self, node: str) -> np.ndarray | None:
        """The report's lines of a result array; None when it was begun without them."""
        return self._table(views_node(node))

    def _table(self, name: str) -> np.ndarray | None:
        if not (self.path / name / "zarr.json").exists():
            return None
        return StoredArray(str(self.path), name)[:]

    def done_units(self, node: str) -> np.ndarray:
        """Boolean per write unit of ``node`` (shard, or chunk when unsharded): True when it is written."""
        done = self.stats(node)[:, -1] == 1
        unit = self.root[stats_node(node)].chunks[0]
        return np.array([done[i : i + unit].all() for i in range(0, done.size, unit)], bool)

    # -- integrity -----------------------------------------------------------------------------------
    def _arrays_of(self, node: str, images: bool) -> list[str]:
        """The arrays holding ``node``'s result: its images (unless discarded) and its tables."""
        names = ([node] if images else []) + [stats_node(node)]
        return names + [t for t in (extra_node(node), views_node(node)) if (self.path / t).exists()]

    def damage(self, node: str, *, images: bool = True) -> dict[int | None, str]:
        """Cheap check that ``node`` and its tables are whole: unit files listed and sized.

        Returns ``{write unit index: what is wrong}``; the key ``None`` when an
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
            what = "shard" if arr.shards is not None else "chunk"
            outer = arr.metadata.chunk_grid.chunk_shape  # a file: the shard, or the chunk when unsharded
            encode = arr.metadata.chunk_key_encoding.encode_chunk_key
            for idx in np.ndindex(*(-(-n // c) for n, c in zip(arr.shape, outer))):
                path = self.path / name / encode(idx)
                try:
                    found = os.stat(path).st_size
                except FileNotFoundError:
                    bad.setdefault(idx[0], f"{name} {what} {idx[0]}: missing")
                    continue
                problem = (_chunk_problem(arr, found) if arr.shards is None
                           else _shard_problem(arr, idx, path, found))
                if problem:
                    bad.setdefault(idx[0], f"{name} {what} {idx[0]}: {problem}")
        return bad

    def has_checksums(self, node: str) -> bool:
        """True when the chunks of ``node`` end with a checksum (arrays of format 1 do not)."""
        codecs = self.root[node].metadata.codecs
        inner = codecs[0].codecs if isinstance(codecs[0], ShardingCodec) else codecs  # a shard's chunk codecs
        return any(isinstance(c, Crc32cCodec) for c in inner)

    def verify_array(self, node: str, *, images: bool = True, workers: int = 1) -> dict[int | None, str]:
        """:meth:`damage`, then every chunk of ``node`` and its tables read through its checksum.

        Keys are write units, as in :meth:`damage`; a chunk of a shard is read alone, so
        that memory stays one chunk per worker and the message names the chunk.
        """
        bad = self.damage(node, images=images)
        if None in bad:
            return bad
        unit = self.root[stats_node(node)].chunks[0]
        jobs = []
        for name in self._arrays_of(node, images):
            arr = self.root[name]
            cz = arr.chunks[0]
            jobs += [(name, i, cz, arr.shards is not None) for i in range(arr.cdata_shape[0])
                     if i * cz // unit not in bad]

        def read(name: str, i: int, cz: int, sharded: bool) -> tuple[int, str] | None:
            try:
                StoredArray(str(self.path), name)[i * cz : (i + 1) * cz]
            except DamagedError as exc:
                where = f"shard {i * cz // unit}, chunk {i}" if sharded else f"chunk {i}"
                return i * cz // unit, f"{name} {where}: {exc.reason}"
            return None

        with ThreadPoolExecutor(workers) as pool:
            for hit in pool.map(lambda job: read(*job), jobs):
                if hit is not None:
                    bad.setdefault(*hit)
        if images:
            for i in np.flatnonzero(~self.done_units(node)):
                bad.setdefault(int(i), f"{stats_node(node)} {self.unit_name(node)} {i}: not marked done")
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

    def mark_undone(self, step: str, node: str, units: Iterable[int]) -> None:
        """Record damaged write units of ``node``: their done flags cleared, ``step`` incomplete."""
        table = self.root[stats_node(node)].with_config(ARRAY_CONFIG)
        unit = table.chunks[0]
        for i in units:
            rows = min(unit, table.shape[0] - i * unit)
            table[i * unit : i * unit + rows] = np.full((rows, table.shape[1]), np.nan)  # rewrites a bad chunk too
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


def _encoded_size(codecs: Iterable[Any], nbytes: int) -> int | None:
    """Bytes that ``nbytes`` of array bytes take after the bytes-to-bytes ``codecs``; None if compressed."""
    for codec in codecs:
        if not codec.is_fixed_size:
            return None
        nbytes = codec.compute_encoded_size(nbytes, None)
    return nbytes


def _chunk_problem(arr: zarr.Array, found: int) -> str | None:
    """What is wrong with a chunk file of ``found`` bytes of an unsharded array (size known uncompressed)."""
    size = _encoded_size(arr.metadata.codecs[1:], int(np.prod(arr.chunks)) * arr.dtype.itemsize)
    return None if size is None or found == size else f"{found} bytes, expected {size}"


def _shard_problem(arr: zarr.Array, idx: tuple[int, ...], path: Path, found: int) -> str | None:
    """What is wrong with the shard file ``idx`` of ``found`` bytes: its size, or else its index."""
    codec = arr.metadata.codecs[0]
    per_shard = int(np.prod([s // c for s, c in zip(arr.shards, arr.chunks)]))
    # the chunks of this shard inside the array: a shard at the end holds fewer
    present = int(np.prod([-(-min(s, n - i * s) // c) for n, s, c, i in zip(arr.shape, arr.shards, arr.chunks, idx)]))
    index_size = _encoded_size(codec.index_codecs[1:], 16 * per_shard)
    chunk_size = _encoded_size(codec.codecs[1:], int(np.prod(arr.chunks)) * arr.dtype.itemsize)
    if chunk_size is not None and index_size is not None:
        size = present * chunk_size + index_size
        return None if found == size else f"{found} bytes, expected {size}"
    if not _checked_index(codec):
        return None  # an index layout we did not write: the full read of verify checks it
    if found < index_size:
        return f"{found} bytes, less than its index"
    with open(path, "rb") as fh:
        fh.seek(found - index_size)
        tail = fh.read()
    if crc32c(tail[:-4]) != tail[-4:]:
        return "its index fails its checksum"
    table = np.frombuffer(tail[:-4], "<u8").reshape(-1, 2)
    used = table[:, 0] != 2**64 - 1
    if used.sum() != present or (table[used].sum(axis=1) > found - index_size).any():
        return f"its index lists {int(used.sum())} chunks of {present}, or bytes past its end"
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value
