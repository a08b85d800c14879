"""TIFF discovery and reading (the only module that opens input images).

Input layout, per channel (a sub-folder of the project folder, ``"."`` for the
folder itself): either one single-page TIFF per slice, sorted in natural order
(``s_2`` before ``s_10``), or one multi-page TIFF holding the whole stack.
Input files are only ever opened for reading.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pystack3d_dask.errors import InputError
from pystack3d_dask.io.metadata import SliceMetadata, instrument_metadata

TIFF_SUFFIXES = (".tif", ".tiff")
#: dtypes accepted as input (FIB-SEM detectors give uint8 / uint16; processed data float32)
SUPPORTED_DTYPES = (np.dtype("uint8"), np.dtype("uint16"), np.dtype("float32"))


def natural_key(name: str) -> list:
    """Sort key that orders embedded integers numerically (``s_2`` before ``s_10``)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


@dataclasses.dataclass(frozen=True)
class ChannelSource:
    """Where one channel's slices come from, after ``ind_min``/``ind_max`` selection."""

    channel: str
    #: the single-page files, one per slice, or a one-element tuple for a multi-page file
    files: tuple[Path, ...]
    #: page index of each slice in a multi-page file, or None for one file per slice
    pages: tuple[int, ...] | None
    shape: tuple[int, int]
    dtype: np.dtype

    @property
    def nslices(self) -> int:
        return len(self.pages) if self.pages is not None else len(self.files)

    @property
    def names(self) -> list[str]:
        """A name per slice (file name, or ``file[page]``) for messages and z positions."""
        if self.pages is None:
            return [f.name for f in self.files]
        return [f"{self.files[0].name}[{p}]" for p in self.pages]

    def part(self, start: int, stop: int) -> ChannelSource:
        """Slices ``start:stop`` only: what one ingest task carries (never every file of the stack)."""
        if self.pages is None:
            return dataclasses.replace(self, files=self.files[start:stop])
        return dataclasses.replace(self, pages=self.pages[start:stop])

    def fingerprint(self) -> list:
        """What identifies the input: names, sizes, modification and change times.

        The change time is set by the system on every write, ``cp -p`` and ``rsync -a``
        included, which keep the modification time.
        """
        return [_stat_record(f) for f in self.files] + [None if self.pages is None else list(self.pages)]


def _stat_record(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_records(sources: Sequence[ChannelSource]) -> dict[str, list]:
    """What :func:`input_changes` compares a later discovery with, per channel."""
    return {src.channel: src.fingerprint() for src in sources}


def input_changes(records: dict[str, list], sources: Sequence[ChannelSource],
                  stored: Callable[[str, int, int], np.ndarray]) -> list[str]:
    """What differs between the input recorded at ingest and ``sources``; empty when nothing.

    Files of the same name, size and times are taken as unchanged; a file whose
    times changed (``touch``, ``cp -p``, ``rsync -a``) is read again and compared
    with its slices as ingested, ``stored(channel, start, stop)``: the store's copy,
    checked by its checksums, is the content fingerprint, and costs nothing at ingest.
    """
    changes = []
    for src in sources:
        old = records.get(src.channel)
        if old is None:
            changes.append(f"channel {src.channel!r} is new")
            continue
        new = src.fingerprint()
        old_files, new_files = {r[0]: r for r in old[:-1]}, {r[0]: r for r in new[:-1]}
        gone = [n for n in old_files if n not in new_files]
        added = [n for n in new_files if n not in old_files]
        if gone or added:
            changes.append(f"channel {src.channel!r}: " + ", ".join(
                f"{len(names)} file(s) {what} ({_first(names)})" for names, what in ((gone, "gone"), (added, "new"))
                if names))
            continue
        if old[-1] != new[-1]:
            changes.append(f"{src.files[0]}: pages {_span(old[-1])} selected, now {_span(new[-1])}")
            continue
        for k, path in enumerate(src.files):
            was, now = old_files[path.name], new_files[path.name]
            if was[1] != now[1]:
                changes.append(f"{path}: {now[1]} bytes, {was[1]} at ingest")
            elif was[2:] != now[2:]:
                start, stop = (0, src.nslices) if src.pages is not None else (k, k + 1)
                if not np.array_equal(read_slices(src, start, stop), stored(src.channel, start, stop)):
                    changes.append(f"{path}: other pixels than at ingest (same size)")
    return changes


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _span(pages: list | tuple | None) -> str:
    return "none" if not pages else f"{pages[0]}..{pages[-1]}"


def _tiff_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"input folder {folder} does not exist.")
    files = [p for p in folder.iterdir() if p.suffix.lower() in TIFF_SUFFIXES and p.is_file()]
    if not files:
        raise InputError(f"input folder {folder} holds no .tif/.tiff file.")
    return sorted(files, key=lambda p: natural_key(p.name))


def _header(path: Path) -> tuple[int, tuple[int, int], np.dtype, SliceMetadata]:
    """Read a TIFF's page count, page shape, dtype and instrument metadata from its header only."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            npages = len(tif.pages)
            shape, dtype = tuple(page.shape), np.dtype(page.dtype)
            try:  # the file is open: its tags cost nothing more
                metadata = instrument_metadata(tif, path)
            except Exception as exc:  # unreadable metadata must not block the images
                detail = str(exc) if isinstance(exc, InputError) else f"{path}: {exc}"
                warnings.warn(f"{detail}; this file's instrument metadata is ignored.", stacklevel=3)
                metadata = SliceMetadata()
    except Exception as exc:  # tifffile raises many types on corrupt files
        raise InputError(f"cannot read TIFF {path}: {exc}") from None
    if len(shape) != 2:
        raise InputError(f"{path} holds a {len(shape)}-D image of shape {shape}; expected 2-D slices.")
    if 0 in shape:
        raise InputError(f"{path} holds an empty image ({shape[-1]} x {shape[0]} px); expected pixels.")
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(
            f"{path} has dtype {dtype}; supported: {', '.join(str(d) for d in SUPPORTED_DTYPES)}."
        )
    return npages, shape, dtype, metadata


def discover(
    root: str | os.PathLike, channels: Sequence[str] = (".",), *, ind_min: int = 0, ind_max: int | None = None,
    metadata: dict[str, list[tuple[Path, SliceMetadata]]] | None = None,
) -> list[ChannelSource]:
    """Find, select and check every channel's slices without reading pixel data.

    Parameters
    ----------
    root : path
        The project folder.
    channels : sequence of str
        Sub-folders, one per channel; ``"."`` is ``root`` itself.
    ind_min, ind_max : int
        First and last slice kept (inclusive); an ``ind_max`` past the end means "to the end".
    metadata : dict, optional
        Filled with each channel's instrument metadata, ``(file, record)`` per slice file (the
        first page of a multi-page file), read in the same header pass (see
        :mod:`pystack3d_dask.io.metadata`).  Kept out of :class:`ChannelSource`, which every
        ingest task carries.

    Raises
    ------
    InputError
        Missing or empty folder, unreadable header, slices of different shape or dtype (naming
        the first offender), channels of different slice counts or shapes.
    """
    root = Path(root)
    sources = []
    for channel in channels:
        folder = root / channel
        if not folder.is_dir():
            raise InputError(f"channel folder {folder} (channel {channel!r}) does not exist.")
        files = _tiff_files(folder)
        npages, shape, dtype, first_meta = _header(files[0])
        if len(files) == 1 and npages > 1:
            pages = list(range(npages))
            total = npages
        else:
            pages = None
            total = len(files)
        last = total - 1 if ind_max is None else min(ind_max, total - 1)
        if ind_min > last:
            raise InputError(
                f"ind_min = {ind_min} leaves no slice in {folder}, which holds {total} slice(s)."
            )
        records = [(files[0], first_meta)]
        if pages is None:
            files = files[ind_min : last + 1]
            records = []
            for f in files:
                n, s, d, meta = _header(f)
                records.append((f, meta))
                if n != 1:
                    raise InputError(f"{f} holds {n} pages, but {folder} holds one file per slice.")
                if s != shape or d != dtype:
                    raise InputError(
                        f"{f} is {s[1]} x {s[0]} px {d}, but {files[0].name} is "
                        f"{shape[1]} x {shape[0]} px {dtype}: every slice must match."
                    )
            src = ChannelSource(channel, tuple(files), None, shape, dtype)
        else:
            src = ChannelSource(channel, (files[0],), tuple(pages[ind_min : last + 1]), shape, dtype)
        if sources and (src.nslices, src.shape, src.dtype) != (sources[0].nslices, sources[0].shape, sources[0].dtype):
            ref = sources[0]
            raise InputError(
                f"channel {channel!r} has {src.nslices} slices of {src.shape[1]} x {src.shape[0]} px "
                f"{src.dtype}, but channel {ref.channel!r} has {ref.nslices} of "
                f"{ref.shape[1]} x {ref.shape[0]} px {ref.dtype}."
            )
        sources.append(src)
        if metadata is not None:
            metadata[channel] = records
    return sources


def read_slices(source: ChannelSource, start: int, stop: int) -> np.ndarray:
    """Read slices ``start:stop`` of a channel as a ``(z, y, x)`` array.

    Raises
    ------
    InputError
        Naming the file (and page) that cannot be decoded or has the wrong shape.
    """
    import tifffile

    out = np.empty((stop - start,) + source.shape, source.dtype)
    if source.pages is None:
        for i, path in enumerate(source.files[start:stop]):
            try:
                with tifffile.TiffFile(path) as tif:
                    page = tif.pages[0]
                    if page.shape != source.shape or page.dtype != source.dtype:
                        raise InputError(f"{path} is {page.shape[-1]} x {page.shape[0]} px {page.dtype}, "
                                         f"expected {source.shape[1]} x {source.shape[0]} px {source.dtype}.")
                    page.asarray(out=out[i])  # decode in place: no second copy
            except InputError:
                raise
            except Exception as exc:
                raise InputError(f"cannot read TIFF {path}: {exc}") from None
        return out
    path = source.files[0]
    with tifffile.TiffFile(path) as tif:
        for i, p in enumerate(source.pages[start:stop]):
            try:
                tif.pages[p].asarray(out=out[i])
            except Exception as exc:
                raise InputError(f"cannot read page {p} of TIFF {path}: {exc}") from None
    return out
