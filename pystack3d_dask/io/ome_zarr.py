"""Export a stack as an OME-Zarr multiscale image (0.5 on Zarr v3, or 0.4 on Zarr v2).

Layout written at ``OUT`` (one image, axes ``c, z, y, x``)::

    OUT/                 group attrs: "ome" (0.5) or "multiscales" + "omero" (0.4), written last;
                         "pystack3d_dask_export": what is exported and whether it is complete
    OUT/0, OUT/1, ...    the levels, finest first

Level 0 is the stack itself.  Level ``n + 1`` is the block mean of level ``n`` *as stored*
(never recomputed from the source, so a level costs one read of the level before it),
halved in y and x, and in z only while that keeps the voxel roughly isotropic: FIB-SEM
slices are often finer in z than in x, and halving z from the first level would
average away what was cut finest.  Each level's transformations are its voxel size
(``scale``) and the centre of its first voxel (``translation``).

Streaming and resume: one task writes one shard (0.5; ``(1, sz, Y, X)`` of whole slices
of one channel) or one group of whole chunks (0.4), so the export holds a few shards per
worker in memory whatever the stack size.  Zarr writes each shard or chunk file
atomically (a temporary file, then a rename): a shard whose file exists is complete,
and an export killed at any moment resumes on the missing ones.  The OME attributes are
written last, so a reader never sees an incomplete image as an OME-Zarr image.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import zarr

from pystack3d_dask.cluster import default_client
from pystack3d_dask.errors import ConfigError, StoreError
from pystack3d_dask.kernels.downsample import mean_downsample

#: formats accepted by :func:`write_ome_zarr` (and ``pystack3d-dask export --format``)
FORMATS = {"ome-zarr": "0.5", "ome-zarr-0.5": "0.5", "ome-zarr-0.4": "0.4"}
AXES = ("c", "z", "y", "x")
#: attribute naming what an export holds (to resume it, or to refuse to overwrite another)
EXPORT_ATTR = "pystack3d_dask_export"
#: z is halved only while the halved z spacing stays within this factor of the new x spacing
ISOTROPY = math.sqrt(2)
#: no level coarser than one whose y and x both fit in this many pixels
COARSEST_PX = 256
#: inner chunk in y and x (the unit a viewer reads) and its largest z depth
TILE_PX = 512
TILE_Z = 4


@dataclasses.dataclass(frozen=True)
class Level:
    """One pyramid level: its shape, how it is made from the level before, and its layout."""

    shape: tuple[int, int, int, int]
    #: (z, y, x) factors from the level before ((1, 1, 1) for level 0)
    factors: tuple[int, int, int]
    #: voxel size and first-voxel centre, (z, y, x)
    scale: tuple[float, float, float]
    translation: tuple[float, float, float]
    #: slices per write unit (a shard in 0.5, a run of whole chunks in 0.4)
    slab: int
    #: inner chunk (the unit a reader fetches)
    chunks: tuple[int, int, int, int]


def parse_format(value: str) -> str:
    """Return the OME-Zarr version (``"0.5"`` or ``"0.4"``) of an export ``--format`` name.

    Raises
    ------
    ConfigError
        An unknown format, naming the allowed ones.
    """
    if value not in FORMATS:
        raise ConfigError(f"format = {value!r} is invalid: expected one of {', '.join(FORMATS)} (or 'tiff').")
    return FORMATS[value]


def plan_levels(shape: tuple[int, int, int, int], itemsize: int, *, scale: Sequence[float],
                translation: Sequence[float] = (0.0, 0.0, 0.0), slab: int | None = None,
                slab_mib: float = 32.0, max_levels: int | None = None) -> list[Level]:
    """The levels of a ``(c, z, y, x)`` image: shapes, factors, voxel sizes and write units.

    Parameters
    ----------
    shape : tuple of 4 int
        ``(c, z, y, x)`` of level 0.
    itemsize : int
        Bytes per voxel.
    scale, translation : sequence of 3 float
        Voxel size and first-voxel centre of level 0, ``(z, y, x)``.
    slab : int, optional
        Slices per write unit of level 0 (e.g. the source's chunk depth, so each unit
        reads whole source chunks); by default about ``slab_mib`` MiB.
    slab_mib : float
        Target size of a write unit (and of the level-``n`` read that makes one of level ``n + 1``).
    max_levels : int, optional
        At most this many levels; by default levels are added until y and x both fit in
        :data:`COARSEST_PX` pixels.
    """
    c, nz, ny, nx = shape
    target = slab_mib * 2**20
    levels = [_level(tuple(shape), (1, 1, 1), tuple(map(float, scale)), tuple(map(float, translation)),
                     slab or target // (ny * nx * itemsize))]
    while (max_levels is None or len(levels) < max_levels) and max(ny, nx) > COARSEST_PX and min(ny, nx) >= 2:
        prev = levels[-1]
        sz, sy, sx = prev.scale
        fz = 2 if nz >= 2 and 2 * sz <= ISOTROPY * 2 * max(sy, sx) else 1
        factors = (fz, 2, 2)
        nz, ny, nx = nz // fz, ny // 2, nx // 2
        # the mean of f voxels sits at the centre of the first f: (f - 1) / 2 voxels further
        translation = tuple(t + (f - 1) / 2 * s for t, f, s in zip(prev.translation, factors, prev.scale))
        read_slice = prev.shape[2] * prev.shape[3] * itemsize * fz
        levels.append(_level((c, nz, ny, nx), factors, (sz * fz, sy * 2, sx * 2), translation,
                             target // read_slice))
    return levels


def _level(shape: tuple[int, int, int, int], factors: tuple[int, int, int], scale: tuple[float, ...],
           translation: tuple[float, ...], slices: float) -> Level:
    """A level whose write unit holds ``slices`` slices (at least 1, at most the stack)."""
    slab = int(max(1, min(shape[1], slices)))
    chunks = (1, math.gcd(slab, TILE_Z), min(shape[2], TILE_PX), min(shape[3], TILE_PX))
    return Level(shape, factors, scale, translation, slab, chunks)


def write_ome_zarr(
    image: Any,
    path: str | os.PathLike,
    *,
    scale: Sequence[float] = (1.0, 1.0, 1.0),
    unit: str | None = "micrometer",
    z_origin: float = 0.0,
    channel_names: Sequence[str] | None = None,
    version: Literal["0.5", "0.4"] = "0.5",
    max_levels: int | None = None,
    slab_mib: float = 32.0,
    source_id: str | None = None,
    quiet: bool = True,
) -> Path:
    """Write ``image`` as an OME-Zarr multiscale image, streamed slab by slab; resumable.

    Parameters
    ----------
    image : array-like
        ``(z, y, x)`` or ``(c, z, y, x)``: a dask, Zarr or numpy array (a lazy one is
        computed one write unit at a time).
    path : path
        The ``.ome.zarr`` folder: new, empty, or a partial export of the same image (resumed).
    scale : sequence of 3 float
        Voxel size ``(z, y, x)`` of level 0, in ``unit``.
    unit : str or None
        An OME/UDUNITS length unit (``"micrometer"``, ``"nanometer"``); None when unknown.
    z_origin : float
        z position of the first slice, in ``unit``.
    channel_names : sequence of str, optional
        One per channel (``omero`` labels); default ``"0"``, ``"1"``, ...
    version : {"0.5", "0.4"}
        0.5: Zarr v3 with shards (napari, neuroglancer, webKnossos); 0.4: Zarr v2 with
        blosc-lz4 chunks, for Fiji's OME-Zarr/N5 readers and BigDataViewer.
    max_levels : int, optional
        Most levels to write (default: down to :data:`COARSEST_PX` pixels).
    slab_mib : float
        Size of one write unit: memory is about this times the number of workers.
    source_id : str, optional
        What identifies the image (e.g. a step's hash), to tell a resumable export from
        another one at ``path``; default: a Zarr array's location, else the dask name of
        ``image`` (for a numpy array, a hash of its content).
    quiet : bool
        No progress bar.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ConfigError
        A bad ``version``, ``scale``, ``channel_names`` or image shape.
    StoreError
        ``path`` is a file, or a non-empty folder that is not a partial export of this image.

    Examples
    --------
    >>> write_ome_zarr(stack, "out.ome.zarr", scale=(0.01, 0.005, 0.005))   # doctest: +SKIP
    """
    from pystack3d_dask.progress import execute

    arr = _as_cz_stack(image)
    if version not in ("0.5", "0.4"):
        raise ConfigError(f"version = {version!r} is invalid: expected '0.5' or '0.4'.")
    scale = tuple(float(s) for s in scale)
    if len(scale) != 3 or not all(math.isfinite(s) and s > 0 for s in scale):
        raise ConfigError(f"scale = {scale!r} is invalid: expected 3 voxel sizes (z, y, x) > 0.")
    names = [str(i) for i in range(arr.shape[0])] if channel_names is None else [str(n) for n in channel_names]
    if len(names) != arr.shape[0]:
        raise ConfigError(f"channel_names = {names!r} is invalid: expected {arr.shape[0]} names, one per channel.")
    source_z = _source_slab(arr, slab_mib) if isinstance(image, da.Array) else None
    levels = plan_levels(arr.shape, arr.dtype.itemsize, scale=scale, translation=(z_origin, 0.0, 0.0),
                         slab=source_z, slab_mib=slab_mib, max_levels=max_levels)
    path = Path(path)
    ident = json.loads(json.dumps({  # as it reads back from the attributes
        "source": source_id or _source_id(image, arr), "version": version, "shape": arr.shape,
        "dtype": str(arr.dtype), "levels": [dataclasses.asdict(lv) for lv in levels], "channels": names,
        "unit": unit}))
    root = _open_output(path, ident, version)
    if root.attrs[EXPORT_ATTR].get("complete"):
        return path
    distributed = default_client() is not None
    prev = None
    for n, level in enumerate(levels):
        stored = _level_array(root, str(n), level, arr.dtype, version)
        lazy = arr if prev is None else _downsampled(prev, level)
        lazy = lazy.rechunk((1, level.slab, -1, -1))
        tasks, total = [], 0
        done = _done_units(path / str(n), stored, level)
        blocks = lazy.to_delayed()
        for (ci, zi, _, _), block in np.ndenumerate(blocks):
            if done[ci, zi]:
                continue
            start = zi * level.slab
            tasks.append(dask.delayed(_write_unit)(block, str(path), str(n), ci, start,
                                                   dask_key_name=f"ome-zarr-{n}-{ci}-{zi}"))
            total += lazy.chunks[1][zi]
        execute(tasks, total=total, desc=f"OME-Zarr level {n}", distributed=distributed, quiet=quiet)
        prev = stored
    window = _window(prev, levels[-1], arr.dtype)
    root.attrs.update({**_ome_attrs(levels, names, window, unit, version),
                       EXPORT_ATTR: {**ident, "complete": True}})
    return path


def _as_cz_stack(image: Any) -> da.Array:
    """``image`` as a lazy ``(c, z, y, x)`` array (a single channel gets a length-1 ``c``)."""
    shape = np.shape(image)
    if len(shape) not in (3, 4) or 0 in shape:
        raise ConfigError(f"image of shape {shape} is invalid: expected a non-empty (z, y, x) or (c, z, y, x) stack.")
    arr = image if isinstance(image, da.Array) else da.from_array(image, chunks=(1,) * (len(shape) - 2) + (-1, -1))
    return arr[None] if arr.ndim == 3 else arr


def _source_slab(arr: da.Array, slab_mib: float) -> int | None:
    """The source's chunk depth when its chunks hold whole slices of about ``slab_mib`` MiB.

    A write unit of whole source chunks reads each source chunk once (a project's store is
    chunked so); other chunkings are regrouped to ``slab_mib``.
    """
    cz = arr.chunks[1][0]
    nbytes = cz * arr.shape[2] * arr.shape[3] * arr.dtype.itemsize
    whole = len(arr.chunks[2]) == len(arr.chunks[3]) == 1
    return cz if whole and slab_mib / 2 <= nbytes / 2**20 <= 2 * slab_mib else None


def _source_id(image: Any, arr: da.Array) -> str:
    """What identifies ``image`` across processes: a Zarr array's location, else the dask name."""
    return f"zarr:{image.store_path}" if isinstance(image, zarr.Array) else arr.name


def _open_output(path: Path, ident: dict, version: str) -> zarr.Group:
    """The output group: created new, or reopened when it is a partial export of the same image."""
    fmt = 3 if version == "0.5" else 2
    if path.exists() and not path.is_dir():
        raise StoreError(f"the export path {path} is a file: give a new or empty folder.")
    if path.is_dir() and any(path.iterdir()):
        try:
            root = zarr.open_group(path, mode="r+", zarr_format=fmt)
            previous = dict(root.attrs.get(EXPORT_ATTR, {}))
        except (OSError, ValueError, KeyError, zarr.errors.GroupNotFoundError):
            previous = None
        if not previous:
            raise StoreError(f"the export path {path} is not empty and holds no pystack3d-dask export: "
                             "give a new or empty folder.")
        previous.pop("complete", None)
        if previous != ident:
            raise StoreError(f"the export path {path} holds another export ({previous.get('source')}, OME-Zarr "
                             f"{previous.get('version')}): remove it or give a new folder.")
        for partial in path.rglob("*.partial"):  # a file a killed export was writing (never renamed)
            partial.unlink(missing_ok=True)
        return root
    try:
        return zarr.create_group(path, zarr_format=fmt, overwrite=True, attributes={EXPORT_ATTR: ident})
    except OSError as exc:
        raise StoreError(f"cannot create the export folder {path}: {exc}") from None


def _level_array(root: zarr.Group, name: str, level: Level, dtype: np.dtype, version: str) -> zarr.Array:
    if name in root:
        return root[name]
    # a shard holds whole inner chunks; at the image edge it reaches past it, like a chunk
    shards = (1, level.slab) + tuple(-(-n // c) * c for n, c in zip(level.shape[2:], level.chunks[2:]))
    if version == "0.5":
        from zarr.codecs import BloscCodec

        return root.create_array(name, shape=level.shape, chunks=level.chunks, shards=shards, dtype=dtype,
                                 compressors=(BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
                                 dimension_names=list(AXES), fill_value=0, config={"write_empty_chunks": True})
    import numcodecs

    return root.create_array(name, shape=level.shape, chunks=level.chunks, dtype=dtype,
                             compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
                             chunk_key_encoding={"name": "v2", "separator": "/"}, fill_value=0,
                             config={"write_empty_chunks": True})


def _downsampled(prev: zarr.Array, level: Level) -> da.Array:
    """Level ``n + 1`` as a lazy block mean of the stored level ``n``, one read unit per output slab."""
    fz, fy, fx = level.factors
    c, nz, ny, nx = level.shape
    src = da.from_zarr(prev, chunks=(1, fz * level.slab, -1, -1))[:, : nz * fz, : ny * fy, : nx * fx]
    return src.map_blocks(mean_downsample, factors=(1, fz, fy, fx), dtype=prev.dtype,
                          chunks=(src.chunks[0], tuple(n // fz for n in src.chunks[1]), (ny,), (nx,)))


def _done_units(folder: Path, arr: zarr.Array, level: Level) -> np.ndarray:
    """Boolean ``(c, slabs)``: True where every storage file of a write unit exists (atomic writes)."""
    grid = arr.metadata.chunk_grid.chunk_shape  # shards in 0.5, chunks in 0.4
    nslabs = -(-level.shape[1] // level.slab)
    done = np.zeros((level.shape[0], nslabs), bool)
    per_unit = level.slab // grid[1]
    ny, nx = (-(-n // g) for n, g in zip(level.shape[2:], grid[2:]))
    nzc = -(-level.shape[1] // grid[1])
    for ci, si in itertools.product(range(level.shape[0]), range(nslabs)):
        zs = range(si * per_unit, min((si + 1) * per_unit, nzc))
        done[ci, si] = all((folder / arr.metadata.encode_chunk_key((ci, z, y, x))).is_file()
                           for z in zs for y in range(ny) for x in range(nx))
    return done


@functools.lru_cache(maxsize=16)
def _open_level(path: str, name: str) -> zarr.Array:
    # once per worker process and level; the write config is a runtime setting, given again
    return zarr.open_array(path, path=name, mode="r+").with_config({"write_empty_chunks": True})


def _write_unit(block: np.ndarray, path: str, name: str, channel: int, start: int) -> int:
    """Write one write unit (whole shards or whole chunks) of channel ``channel``; return its slices."""
    _open_level(path, name)[channel, start : start + block.shape[1]] = block[0]
    return block.shape[1]


def _window(coarsest: zarr.Array, level: Level, dtype: np.dtype) -> list[dict[str, float]]:
    """Display window per channel: the coarsest level's range (cheap), within the dtype's.

    Reduced slab by slab: the coarsest level still holds most of the slices, as z is halved
    only with x and y.
    """
    data = da.from_zarr(coarsest, chunks=(1, level.slab, -1, -1))
    if dtype.kind == "f":  # NaN and inf (pixels from outside the image) are no contrast
        data = da.where(da.isfinite(data), data, np.nan)
        lows, highs = dask.compute(da.nanmin(data, axis=(1, 2, 3)), da.nanmax(data, axis=(1, 2, 3)))
    else:
        lows, highs = dask.compute(data.min(axis=(1, 2, 3)), data.max(axis=(1, 2, 3)))
    out = []
    for lo, hi in zip(lows.astype(float).tolist(), highs.astype(float).tolist()):
        lo, hi = (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else (0.0, 1.0)
        full = (float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)) if dtype.kind in "ui" else (lo, hi)
        out.append({"min": full[0], "max": full[1], "start": lo, "end": hi})
    return out


def _ome_attrs(levels: list[Level], names: list[str], window: list[dict], unit: str | None,
               version: str) -> dict:
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": ax, "type": "space", **({"unit": unit} if unit else {})} for ax in AXES[1:]]
    datasets = [{"path": str(n), "coordinateTransformations": [
        {"type": "scale", "scale": [1.0, *lv.scale]},
        {"type": "translation", "translation": [0.0, *lv.translation]}]} for n, lv in enumerate(levels)]
    multiscale = {"name": "pystack3d-dask export", "axes": axes, "datasets": datasets, "type": "mean"}
    omero = {"channels": [{"label": name, "color": "FFFFFF", "active": True, "window": w}
                          for name, w in zip(names, window)],
             "rdefs": {"model": "greyscale"}}
    if version == "0.4":
        return {"multiscales": [{"version": "0.4", **multiscale}], "omero": omero}
    return {"ome": {"version": "0.5", "multiscales": [multiscale], "omero": omero}}
