"""The workflow: ingest once, then run ``process_steps`` in order, resumable shard by shard.

For each step and channel the engine takes the previous step's stored result
as a lazy array of chunks, gets the step's global state (computed once, or
loaded from the store), builds the step's lazy graph and writes it with one
task per write unit, a shard of k chunks (:func:`pystack3d_dask.store.write_block`:
data, then per-slice statistics and a done flag, so every step reads its input
once).  Each chunk is cast to the stored dtype in the task that computed it
(:func:`pystack3d_dask.store.prepare_block`); the shard's task gathers them.

The layout, chunks of ``chunk_mib`` and shards of ``shard_mib``, is chosen at
ingest and kept by every step; a store ingested unsharded (formats 1 and 2)
stays so until ``--force input``.

Resume and change detection rest on one *chain hash* per step: a digest of
the input files, the chunking (and sharding) and the parameters of this step and of every
step before it.  A complete step whose hash matches is skipped; a step whose
hash changed is recomputed with every step after it; a step with the same hash
but missing shards (a killed run) computes only those shards.

Each step (the ingest too) runs as one transaction (:meth:`Project._transact`):
its result is written beside the old one, checked whole, then swapped in with
its statistics and state.  An error removes only what the failing step wrote
in this run; an interruption keeps every written shard for the next run.
Before a complete step is used, its files are checked whole (listing and
sizes); damaged shards are marked undone and recomputed, byte-identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask
import numpy as np
from dask.delayed import Delayed

from pystack3d_dask import processes
from pystack3d_dask.cluster import ClusterConfig, cluster_config, scheduler
from pystack3d_dask.config import params_hash, suggest
from pystack3d_dask.errors import ConfigError, DamagedError, DiskFullError, InputError, StoreError
from pystack3d_dask.io.metadata import metadata_zpos, stack_metadata, summary
from pystack3d_dask.io.tiff import (
    ChannelSource,
    discover,
    file_records,
    input_changes,
    read_slices,
)
from pystack3d_dask.kernels.crop import area_slices
from pystack3d_dask.lazy import lazy_module
from pystack3d_dask.progress import execute, state_progress
from pystack3d_dask.project_config import ProjectConfig, load_config
from pystack3d_dask.signals import interruptible
from pystack3d_dask.steps import get_step
from pystack3d_dask.steps.base import StepContext, default_chunk_slices
from pystack3d_dask.store import (
    COMPRESSION,
    INPUT,
    NEW,
    STATS_COLUMNS,
    STORE_NAME,
    Block,
    ProjectStore,
    StoredArray,
    channel_key,
    check_writable,
    prepare_block,
    project_lock,
    shard_slices,
    write_block,
    write_error,
)

da = lazy_module("dask.array")

log = logging.getLogger("pystack3d_dask")

#: default size of a chunk of whole slices
CHUNK_MIB = 32.0
#: default size of a shard (one file of whole chunks, written by one task, which holds the
#: shard's chunks: ~1x the shard, ~3x compressed); at 10 000 slices of 8192² uint16, shards
#: of 512 MiB (4 slices) make 5 000 files per step instead of 20 000.
SHARD_MIB = 512.0


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class RunReport:
    """What a run did, step by step (also printed by the CLI)."""

    done: list[str] = dataclasses.field(default_factory=list)
    #: slices computed per step in this run (all channels): fewer than the stack after a resume
    computed: dict[str, int] = dataclasses.field(default_factory=dict)
    #: wall-clock seconds per step computed in this run (state and write pass)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)
    messages: list[str] = dataclasses.field(default_factory=list)
    #: called with each step's name as soon as the step is complete (the report's hook)
    on_done: Callable[[str], None] | None = dataclasses.field(default=None, repr=False, compare=False)

    def step_done(self, name: str) -> None:
        """Record ``name`` as computed in this run and tell :attr:`on_done`."""
        self.done.append(name)
        if self.on_done is not None:
            self.on_done(name)


class Project:
    """A PyStack3D project: a parameter file, its input TIFFs and a Zarr store of the results.

    Parameters
    ----------
    params : path or mapping
        The ``params.toml`` file, the folder holding it, or an already-parsed table.
    output_dir : path, optional
        Where the store goes (default: the project folder).
    chunk_mib : float
        Target size of a chunk of whole slices.
    chunk_slices : int, optional
        Slices per chunk, overriding ``chunk_mib``.
    shard_mib : float, optional
        Target size of a shard: whole chunks in one file, written and resumed as one
        (default :data:`SHARD_MIB` for a new ingest, else the store's layout); 0 writes
        unsharded arrays (one file per chunk).  Like the chunk size, it is chosen at
        ingest: another value for a stored input needs ``force=["input"]``.
    shard_chunks : int, optional
        Chunks per shard, overriding ``shard_mib``.
    cluster : ClusterConfig, mapping or str, optional
        Overrides the ``[cluster]`` table: a cluster type (``"threads"``, ``"local"``,
        ``"slurm"``...: the table if it is of that type, else the type's defaults), a
        scheduler address, a mapping of ``[cluster]`` keys or a :class:`ClusterConfig`.
    compression : {"none", "lz4", "zstd"}
        Chunk compression of the arrays written by this run (see :data:`store.COMPRESSION`).
    keep : {"all", "last"}
        ``"last"`` deletes a step's images once the next step has read them (statistics and
        state stay): the store holds the input and the last result only.  A later change of
        an earlier step then recomputes from the last images still stored.
    quiet : bool
        No progress bars.

    Examples
    --------
    >>> project = Project("my_stack/params.toml")        # doctest: +SKIP
    >>> project.run()                                    # doctest: +SKIP
    >>> project.result("bkg_removal", "SE2")             # doctest: +SKIP
    dask.array<...>
    """

    def __init__(
        self,
        params: str | os.PathLike | Mapping[str, Any],
        *,
        output_dir: str | os.PathLike | None = None,
        chunk_mib: float = CHUNK_MIB,
        chunk_slices: int | None = None,
        shard_mib: float | None = None,
        shard_chunks: int | None = None,
        cluster: ClusterConfig | Mapping | str | None = None,
        compression: str = "none",
        keep: str = "all",
        quiet: bool = False,
    ):
        self.config: ProjectConfig = load_config(params)
        self.output_dir = Path(output_dir) if output_dir is not None else self.config.project_dir
        self.store_path = self.output_dir / STORE_NAME
        for key, value in (("chunk_slices", chunk_slices), ("shard_chunks", shard_chunks)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{key} = {value!r} is invalid: expected an integer >= 1.")
        _check_mib("chunk_mib", chunk_mib, zero=False)
        if shard_mib is not None:
            _check_mib("shard_mib", shard_mib, zero=True)
        self.chunk_mib = chunk_mib
        self.chunk_slices = chunk_slices
        self.shard_mib = shard_mib
        self.shard_chunks = shard_chunks
        self.cluster = cluster_config(cluster, self.config.cluster) if cluster is not None else self.config.cluster
        if compression not in COMPRESSION:
            raise ConfigError(f"compression = {compression!r} is invalid: expected one of {list(COMPRESSION)}.")
        self.compression = compression
        if keep not in ("all", "last"):
            raise ConfigError(f"keep = {keep!r} is invalid: expected 'all' or 'last'.")
        self.keep = keep
        self.quiet = quiet
        nodes: dict[str, str] = {}
        for ch in self.config.channels:
            other = nodes.setdefault(channel_key(ch), ch)
            if other != ch:
                raise ConfigError(f"channels {other!r} and {ch!r} would be stored under one name "
                                  f"({channel_key(ch)!r}): rename one of the folders.")

    # -- public API --------------------------------------------------------------------------------
    def run(self, steps: Sequence[str] | None = None, *, force: Iterable[str] = (), plots: bool = True) -> RunReport:
        """Ingest if needed and run the steps (all of ``process_steps`` by default).

        Parameters
        ----------
        steps : sequence of str, optional
            Run only up to the last of these steps (earlier ones run if needed); ``[]``
            only ingests the input.
        force : iterable of str
            Steps to recompute even if complete (with every step after them); ``"input"``
            ingests the images again, which is needed to accept changed input images.
        plots : bool
            Write the report, ``pystack3d_dask_report/index.html`` beside the store: each
            step's figures are drawn in a background thread while the next step computes.
        """
        cfg = self.config
        todo = list(cfg.steps_to_run)
        for name in list(steps or []) + list(force):
            if name not in todo and not (name == INPUT and name in force):
                raise ConfigError(f"step {name!r} is not among the steps to run{suggest(name, todo)}: {todo}.")
        if steps is not None:  # an empty list ingests only
            todo = todo[: max((todo.index(s) + 1 for s in steps), default=0)]
        force = set(force)
        records: dict = {}  # instrument metadata, read in discovery's header pass
        sources = discover(cfg.project_dir, cfg.channels, ind_min=cfg.ind_min, ind_max=cfg.ind_max,
                           metadata=records)
        self._check_params(todo, sources[0])
        zpos = self._zpos(sources[0])
        check_writable(self.output_dir)
        report = RunReport()
        writer = None
        if plots:
            from pystack3d_dask.report import ReportWriter

            writer = ReportWriter(self)
            report.on_done = writer.step_done
        with interruptible(), project_lock(self.output_dir):
            new_store = not self.store_path.exists()
            try:
                store = ProjectStore(self.store_path, compression=self.compression)
                store.recover()
                with contextlib.ExitStack() as stack:
                    # the cluster starts with the first step that has work: a run with nothing
                    # to do submits no batch job and starts no worker
                    cluster = functools.cache(lambda: self._start_scheduler(stack, todo))
                    start = time.perf_counter()
                    self._ingest(store, sources, records, zpos, report, cluster, force=INPUT in force)
                    report.seconds[INPUT] = time.perf_counter() - start
                    self._run_steps(store, todo, force, report, cluster)
            except BaseException as exc:
                if writer is not None:
                    writer.abort()  # no page for a run that did not end
                if not isinstance(exc, Exception):
                    raise
                # An error (bad input, bad parameter) removes what the failing step wrote (see
                # _transact), and a store that holds no complete result; an interruption (Ctrl-C,
                # SIGTERM, SIGKILL, a walltime, a full disk) keeps what is written, for the next
                # run to resume from: it is not an Exception (see signals.py) or is said so.
                if isinstance(exc, DamagedError):  # a chunk read in this run failed its checksum
                    store.record_damage(exc)
                    raise StoreError(f"{exc.node} (from slice {exc.start}) in {self.store_path} cannot be read "
                                     f"({exc.reason}): it is marked for recomputation; run again to recompute "
                                     "it.") from None
                disk_full = _disk_full(exc)
                if new_store and not (self.store_path / INPUT).exists() and not disk_full:
                    shutil.rmtree(self.store_path, ignore_errors=True)
                if disk_full and not isinstance(exc, DiskFullError):  # metadata, state: not a chunk
                    stack = sources[0].nslices * int(np.prod(sources[0].shape)) * sources[0].dtype.itemsize
                    raise write_error(exc, self.store_path, stack * len(sources), "a step (its whole result, "
                                      "at most)") from None
                raise
            if writer is not None:
                writer.finish(report)
        return report

    def verify(self) -> dict[str, dict[str, list[str]]]:
        """Read every stored chunk through its checksum and check it against its completion record.

        Damaged chunks are recorded as not done (their steps become incomplete), so that
        the next :meth:`run` recomputes exactly them; a step whose metadata is unreadable
        is removed, to be recomputed whole.

        Returns
        -------
        dict
            ``{step: {channel: [what is damaged, ...]}}``, empty when the store is whole.
        """
        found: dict[str, dict[str, list[str]]] = {}
        unchecked = []
        with project_lock(self.output_dir):
            store = self._open_store()
            for step, channel, node, images in self._stored_nodes(store):
                bad = store.verify_array(node, images=images, workers=max(1, self.config.nproc))
                if bad:
                    found.setdefault(step, {})[channel] = [bad[k] for k in sorted(bad, key=str)]
                    self._record_damage(store, step, node, bad)
                elif images and not store.has_checksums(node):
                    unchecked.append(node)
            for step in store.steps():
                for key in store.state_keys(step):
                    try:
                        store.load_state(step, key)
                    except StoreError as exc:
                        found.setdefault(step, {}).setdefault("_state", []).append(f"state {key}: {exc}")
                        store.delete_state(step, key)
        if unchecked:
            warnings.warn(f"{', '.join(unchecked)} were written without checksums (before store format 2): only "
                          "missing or truncated chunks are found in them; `run --force input` rewrites them.",
                          stacklevel=2)
        return found

    def result(self, step: str = INPUT, channel: str | None = None) -> da.Array:
        """The stored result of ``step`` (``"input"`` for the ingested stack) as a lazy array."""
        store, _, node = self._complete(step, channel)
        return store.lazy(node)

    def stored(self, step: str = INPUT, channel: str | None = None) -> StoredArray:
        """The stored result of ``step``, read into numpy arrays through its checksums (no dask graph).

        For readers of a few slices (the report): ``stored(step)[k]`` is slice ``k``.
        """
        store, _, node = self._complete(step, channel)
        return StoredArray(str(store.path), node)

    def view_lines(self, step: str, channel: str | None = None) -> np.ndarray | None:
        """The centre row and column and the stripe power of every slice of ``step``'s result.

        A ``(z, x + y + 1)`` float32 table computed as the result was written (see
        :func:`pystack3d_dask.kernels.views.view_lines`); None for a result begun
        by a version that did not write it.
        """
        store, _, node = self._complete(step, channel, images=False)
        return store.views(node)

    def has_images(self, step: str) -> bool:
        """True when ``step`` is complete and its images are stored (not discarded by ``keep='last'``)."""
        store = self._open_store()
        return bool((store.info(step) or {}).get("complete")) and not _discarded(store, step)

    def zpos(self, step: str = INPUT) -> np.ndarray | None:
        """z positions of the slices of ``step``'s result, when known."""
        info = self._open_store().info(step) or {}
        return None if info.get("zpos") is None else np.asarray(info["zpos"], float)

    def stats(self, step: str, channel: str | None = None) -> dict[str, np.ndarray]:
        """Per-slice statistics of ``step``: min, max, mean of input, raw result and result.

        Keys ``input_min``, ``input_max``, ``input_mean``, ``raw_min``, ... ``min``, ``max``, ``mean``.
        The ``input_*`` arrays have the input's slice count (it differs after ``resampling``).
        """
        store, info, node = self._complete(step, channel, images=False)
        channel = channel or self.config.channels[0]
        table = store.stats(node)
        out = {name: table[:, i] for i, name in enumerate(STATS_COLUMNS[:-1])}
        if step != INPUT:
            prev = store.stats(store.node(info["input"], channel))
            for i, name in enumerate(("min", "max", "mean")):
                out[f"input_{name}"] = prev[:, 3 + i]
        return out

    def state(self, step: str, channel: str | None = None) -> dict | None:
        """The saved global state of ``step`` (coefficients, histograms, matrices...)."""
        store = self._open_store()
        channel = channel or self.config.channels[0]
        spec = get_step(step)
        state = store.load_state(step, _state_key(spec, self.config, channel))
        if state is not None and spec.write_reduction is not None:
            after = store.extra(store.node(step, channel))
            if after is not None:
                state[spec.write_reduction_key] = after
        return state

    def info(self) -> dict[str, Any]:
        """Summary of the store: per step, completion, shape, chunks, dtype and statistics.

        A step whose chunks are missing or truncated has the status ``"damaged: ..."``.
        """
        store = self._open_store()
        out = {"store": str(self.store_path), "channels": list(self.config.channels),
               "metadata": summary((store.info(INPUT) or {}).get("metadata"), self.config.metadata), "steps": {}}
        for step in (INPUT,) + self.config.process_steps:
            info = store.info(step)
            pending = store.info(step + NEW)
            if info is None and pending is None:
                out["steps"][step] = {"status": "not run"}
                continue
            entry = {"status": "not run" if info is None else "complete" if info.get("complete") else "partial"}
            if info is not None:
                entry["hash"] = info.get("hash")  # identifies the result: its input, chunking and parameters
            if pending is not None:  # an interrupted recomputation: its shards wait beside the result
                node = store.node(step + NEW, self.config.channels[0])
                done = store.done_units(node) if not pending.get("alias") and (store.path / node).exists() else None
                entry["next"] = "being computed" + ("" if done is None else f" ({int(done.sum())}/{done.size} "
                                                                            f"{store.unit_name(node)}s): run again to "
                                                                            "finish it")
            if info is None:
                out["steps"][step] = entry
                continue
            if info.get("discarded"):
                entry["status"] += " (images discarded)"
            if info.get("alias"):
                entry["result"] = f"same images as {info['alias']}"
            damage = [d for ch in self.config.channels
                      for d in store.damage(store.node(step, ch), images=not _discarded(store, step)).values()]
            if damage:
                entry["status"] = f"damaged: {damage[0]}" + (f" (and {len(damage) - 1} more)" if len(damage) > 1
                                                             else "")
            else:
                node = store.node(step, self.config.channels[0])
                table = store.stats(node)
                if not _discarded(store, step):
                    arr = store.array(node)
                    entry.update(shape=arr.shape, chunks=arr.chunks, shards=arr.shards, dtype=str(arr.dtype))
                    done = store.done_units(node)
                    entry[f"{store.unit_name(node)}s_done"] = f"{int(done.sum())}/{done.size}"
                for name, col, fn in (("min", 3, np.nanmin), ("max", 4, np.nanmax), ("mean", 5, np.nanmean)):
                    entry[name] = float(fn(table[:, col])) if np.isfinite(table[:, col]).any() else None
            out["steps"][step] = entry
        return out

    def export(self, step: str, folder: str | os.PathLike, *, channel: str | None = None,
               format: str = "tiff") -> Path:
        """Write ``step``'s result as a folder of TIFF slices, or as an OME-Zarr image.

        ``format``: ``"tiff"`` (one channel, z positions in the names; a folder left by an
        interrupted export of the same step is completed), ``"ome-zarr"`` (OME-Zarr 0.5,
        Zarr v3) or ``"ome-zarr-0.4"`` (Zarr v2, for Fiji and BigDataViewer): one multiscale
        ``(c, z, y, x)`` image of every channel (or of ``channel``), with the voxel size from
        the instrument metadata or ``[metadata]``, streamed and resumable (see
        :mod:`pystack3d_dask.io.ome_zarr`).
        """
        if format == "tiff":
            from pystack3d_dask.io.export import export_tiff

            stack = self.result(step, channel)
            source = f"{self._open_store().info(step)['hash']}/{channel or self.config.channels[0]}"
            return export_tiff(stack, folder, prefix=step, zpos=self.zpos(step), source=source)
        from pystack3d_dask.io.metadata import voxel_size_um
        from pystack3d_dask.io.ome_zarr import parse_format, write_ome_zarr

        version = parse_format(format)
        channels = [channel] if channel is not None else list(self.config.channels)
        stack = da.stack([self.result(step, ch) for ch in channels])
        store = self._open_store()
        metadata = store.info(INPUT).get("metadata")
        scale, z0 = voxel_size_um(metadata, self.config.metadata, self.zpos(step))
        unit = None if scale is None else "micrometer"
        names = [_channel_label(ch, metadata, self.config.project_dir) for ch in channels]
        with scheduler(self.cluster, nproc=self.config.nproc):
            return write_ome_zarr(stack, folder, scale=scale or (1.0, 1.0, 1.0), unit=unit, z_origin=z0,
                                  channel_names=names, version=version,
                                  source_id=f"{self.store_path.resolve()}:{step}:{store.info(step)['hash']}",
                                  quiet=self.quiet)

    # -- internals --------------------------------------------------------------------------------
    def _complete(self, step: str, channel: str | None, *, images: bool = True) -> tuple[ProjectStore, dict, str]:
        """The store, the step's attributes and its whole result node, or a clear error."""
        if channel is not None and channel not in self.config.channels:
            raise ConfigError(f"channel = {channel!r} is invalid: expected one of {list(self.config.channels)}.")
        known = (INPUT,) + self.config.process_steps
        if step not in known:
            raise ConfigError(f"step {step!r} is not in this project{suggest(step, known)}: expected one of "
                              f"{list(known)}.")
        store = self._open_store()
        info = store.info(step)
        if info is None or not info.get("complete"):
            raise StoreError(f"step {step!r} has no complete result in {self.store_path}.")
        if images and _discarded(store, step):
            raise StoreError(f"the images of step {step!r} were discarded (keep='last'): run with "
                             f"keep='all' (or --force {step}) to have them again.")
        node = store.node(step, channel or self.config.channels[0])
        damage = store.damage(node, images=images)
        if damage:
            raise StoreError(f"step {step!r} in {self.store_path} is damaged ({next(iter(damage.values()))}): "
                             "run the project again to recompute it.")
        return store, info, node

    def _open_store(self) -> ProjectStore:
        if not (self.store_path / "zarr.json").exists():
            raise StoreError(f"no store at {self.store_path}: run the project first.")
        store = ProjectStore(self.store_path)
        channels = store.meta.get("channels")
        if channels is not None and list(channels) != list(self.config.channels):
            raise StoreError(f"the store {self.store_path} holds channels {channels}, not this project's "
                             f"{list(self.config.channels)}: it was written for another project.")
        return store

    def _stored_nodes(self, store: ProjectStore) -> Iterator[tuple[str, str, str, bool]]:
        """``(step, channel, node, images stored)`` of every complete step, each node once."""
        seen = set()
        for step in (INPUT,) + self.config.process_steps:
            info = store.info(step)
            if not info or not info.get("complete") or info.get("alias"):
                continue
            for ch in self.config.channels:
                node = store.node(step, ch)
                if node not in seen:
                    seen.add(node)
                    yield step, ch, node, not _discarded(store, step)

    @staticmethod
    def _record_damage(store: ProjectStore, step: str, node: str, bad: dict) -> None:
        """Mark damaged chunks undone (the step whole when its metadata is unreadable)."""
        if None in bad:
            store.delete(step)
        else:
            store.mark_undone(step, node, [i for i in bad if i is not None])

    def _check_params(self, todo: list[str], source: ChannelSource) -> None:
        """Check every step's areas (and its own shape checks) against the image shape known after
        discovery, before any work."""
        shape = (source.nslices,) + source.shape
        cfg = self.config
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clipping is said when the step runs
            for name in cfg.process_steps:
                params = cfg.step_params[name]
                step = get_step(name)
                area = getattr(params, "area", None)
                if area is not None and name in todo:
                    area_slices(area, shape[1:], key=f"[{name}] area")
                if step.check_shape is not None and name in todo:
                    step.check_shape(params, shape)
                shape = step.shape_out(params, shape)

    def _zpos(self, source: ChannelSource) -> np.ndarray | None:
        """z positions from the file names with the resampling ``policy`` (or PyStack3D's default one).

        Required only by resampling; otherwise names that do not match give no positions.
        """
        from pystack3d_dask.io.zpos import DEFAULT_POLICY, parse_zpos

        policy = getattr(self.config.step_params.get("resampling"), "policy", DEFAULT_POLICY)
        if source.pages is not None or self.config.metadata.zpos == "metadata":
            return None  # the instrument's slice positions are read at ingest
        try:
            return parse_zpos(source.names, policy)
        except Exception:
            if "resampling" in self.config.steps_to_run:
                raise
            return None

    def _cz(self, shape: tuple[int, ...], dtype: Any) -> int:
        if self.chunk_slices is not None:
            return min(self.chunk_slices, shape[0])
        return default_chunk_slices(shape, dtype, target_mib=self.chunk_mib)

    def _sz(self, shape: tuple[int, ...], dtype: Any, cz: int) -> int | None:
        """Slices per shard for a new ingest: whole chunks, at most the stack; None: unsharded."""
        if self.shard_chunks is not None:
            return cz * min(self.shard_chunks, -(-shape[0] // cz))
        if self.shard_mib == 0:
            return None
        return shard_slices(shape, dtype, cz, target_mib=self.shard_mib or SHARD_MIB)

    def _transact(self, store: ProjectStore, name: str, chain: str, write: Callable[[str], int], *,
                  fresh: bool) -> int:
        """Run one step as a transaction: write beside the old result, check it whole, swap it in.

        ``write(target)`` writes the step's result, statistics and state into the
        group ``target`` and records it complete there; returns the slices computed.
        An error removes what this run wrote for the step (the old result stays);
        an interruption keeps it, for the next run to resume.
        """
        target = store.begin(name, chain, fresh=fresh)
        created = not (store.path / target).exists()
        try:
            computed = write(target)
            for ch in self.config.channels:
                node = store.node(target, ch)
                info = store.info(target)
                if not info.get("alias") and (store.damage(node) or not store.done_units(node).all()):
                    raise StoreError(f"{node} in {store.path} is not whole after it was written: the disk "
                                     f"lost a {store.unit_name(node)}; run again to recompute it.")
        except Exception as exc:
            if created and target != name and not _disk_full(exc):  # a full disk is an interruption
                store.abort(name)
            raise
        store.commit(name, target)
        return computed

    def _ingest(self, store: ProjectStore, sources: list[ChannelSource], records: dict, zpos,
                report: RunReport, cluster: Callable[[], bool], *, force: bool) -> None:
        """Ingest the input images; ``cluster()`` starts the scheduler (True: ``distributed``)."""
        cfg = self.config
        src0 = sources[0]
        shape = (src0.nslices,) + src0.shape
        cz = self._cz(shape, src0.dtype)
        metadata = stack_metadata(records, pixel_size_override=cfg.metadata.pixel_size_nm is not None)
        if cfg.metadata.zpos == "metadata":
            zpos = metadata_zpos(metadata, src0.names)
        info = store.info(INPUT)
        stored = self._stored_layout(store) if info is not None and not force else None
        if stored is not None and self.shard_mib is None and self.shard_chunks is None:
            sz = stored[1]  # the store's layout (unsharded in a store of format 1 or 2)
        else:
            sz = self._sz(shape, src0.dtype, cz)
        # an unsharded ingest keeps the hash of format 2: its steps are not recomputed
        chain = _digest([s.fingerprint() for s in sources], cfg.channels, cz, *([] if sz is None else [sz]))
        if info is not None and not force:
            changes = self._input_changes(store, info, sources, cz, sz, stored) + _zpos_change(info, zpos)
            if changes:
                raise InputError(f"the input changed since {self.store_path} was written ({'; '.join(changes)}): "
                                 "every step would be recomputed from it. Run again with --force input "
                                 "(Project.run(force=['input'])) to start afresh; until then every result "
                                 "stays as it is.")
            chain = info["hash"]
            store.set_info(INPUT, files=file_records(sources))  # content checked: no rehash next time
            if info.get("zpos") is None and zpos is not None:  # found since the ingest; nothing used them
                store.set_info(INPUT, zpos=zpos.tolist())
            if "metadata" not in info:  # a store ingested before the instrument metadata was read
                store.set_info(INPUT, metadata=metadata)
        if info is not None and info.get("complete") and info.get("hash") == chain and not force:
            if not self._repair(store, INPUT, report):
                report.skipped.append(INPUT)
                return
        elif info is not None:
            report.messages.append("input: ingesting the images again (forced): every step will be recomputed")

        def write(target: str) -> int:
            store.set_meta(channels=list(cfg.channels), project_dir=str(cfg.project_dir))
            store.set_info(target, hash=chain, complete=False, zpos=None if zpos is None else zpos.tolist(),
                           names=src0.names, first_index=cfg.ind_min, files=file_records(sources),
                           metadata=metadata)
            tasks, total = [], 0
            for src in sources:
                node = store.create_result(target, src.channel, shape, cz, src.dtype, shard=sz)
                key = f"input-{channel_key(src.channel)}"
                blocks = [dask.delayed(_read_block)(src.part(start, min(start + cz, shape[0])),
                                                    dask_key_name=f"read-{key}-{i}")
                          for i, start in enumerate(range(0, shape[0], cz))]
                new, n = _write_tasks(blocks, shape[0], cz, sz, store.done_units(node), str(store.path), node, key=key)
                tasks += new
                total += n
            execute(tasks, total=total, desc="ingest", distributed=cluster(), quiet=self.quiet, **_units(cz, sz))
            store.set_info(target, complete=True)
            return total

        report.computed[INPUT] = self._transact(store, INPUT, chain, write, fresh=force)
        report.step_done(INPUT)

    def _input_changes(self, store: ProjectStore, info: dict, sources: list[ChannelSource], cz: int,
                       sz: int | None, layout: tuple[int, int | None] | None) -> list[str]:
        """What changed in the input since the ingest (files, channels, chunking); empty if nothing.

        ``layout``: the ingested ``(chunk, shard)`` slices (None when its metadata is unreadable).
        """
        cfg = self.config
        if info.get("files") is None:  # a store of format 1: its hash holds names, sizes and times
            legacy = [[(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in s.files] + [s.pages]
                      for s in sources]
            hashes = {_digest(legacy, cfg.channels, cfg.ind_min, ind_max, cz) for ind_max in (cfg.ind_max, None)}
            return [] if info.get("hash") in hashes else ["the input images, slice range or chunking changed"]
        changes = []
        stored = store.meta.get("channels")
        if stored != list(cfg.channels):
            return [f"channels {list(cfg.channels)}, {stored} at ingest"]
        stored_cz, stored_sz = layout or (cz, sz)  # damaged metadata: the repair that follows ingests again
        if stored_cz != cz:
            changes.append(f"chunks of {cz} slices, {stored_cz} at ingest (chunk size options)")
        if stored_sz != sz:
            changes.append(f"{_shards(sz)}, {_shards(stored_sz)} at ingest (shard size options)")
        return changes + input_changes(info["files"], sources,
                                       lambda ch, start, stop: store.read(store.node(INPUT, ch), start, stop))

    def _stored_layout(self, store: ProjectStore) -> tuple[int, int | None] | None:
        """Slices per chunk and per shard of the ingested input; None when its metadata is unreadable."""
        node = store.node(INPUT, self.config.channels[0])
        try:
            return store.array(node).chunks[0], store.shard_slices(node)
        except Exception:
            return None

    def _repair(self, store: ProjectStore, step: str, report: RunReport) -> bool:
        """Cheap check of a complete step's stored chunks; record the damage.  True if damaged."""
        damaged = False
        for st, ch, node, images in self._stored_nodes(store):
            if st != step:
                continue
            bad = store.damage(node, images=images)
            if bad:
                damaged = True
                report.messages.append(f"{step}: {'; '.join(bad.values())}: recomputing "
                                       + ("the step" if None in bad else f"{len(bad)} {store.unit_name(node)}(s)"))
                self._record_damage(store, step, node, bad)
        return damaged

    def _run_steps(self, store: ProjectStore, todo: list[str], force: set[str], report: RunReport,
                   cluster: Callable[[], bool]) -> None:
        cfg = self.config
        chain = store.info(INPUT)["hash"]
        prev = INPUT
        if cfg.history:
            last = cfg.history[-1]
            if (store.info(last) or {}).get("complete") and not _discarded(store, last):
                prev = last
            else:
                warnings.warn(f"history lists {list(cfg.history)} as done but the store holds no result for "
                              f"{last!r}: the input images are taken as its result.", stacklevel=3)
            chain = _digest(chain, "history", cfg.history)
        chains = []
        for name in todo:
            chain = _digest(chain, name, params_hash(cfg.step_params[name]))
            chains.append(chain)
        for name, chain in zip(todo, chains):
            if (store.info(name) or {}).get("hash") == chain:
                self._repair(store, name, report)
        force = force | self._recompute_discarded(store, todo, chains, force)
        forced = INPUT in report.done and INPUT in force
        for name, chain in zip(todo, chains):
            step = get_step(name)
            params = cfg.step_params[name]
            forced = forced or name in force
            info = store.info(name)
            if info is not None and not forced and info.get("hash") == chain and info.get("complete"):
                report.skipped.append(name)
                prev = name
                continue
            if info is not None and (forced or info.get("hash") != chain):
                why = "forced" if forced else "its parameters or an earlier step changed"
                report.messages.append(f"{name}: recomputing ({why})")
            start = time.perf_counter()
            report.computed[name] = self._transact(
                store, name, chain, functools.partial(self._run_step, store, step, params, prev, chain,
                                                      cluster()), fresh=forced)
            report.seconds[name] = time.perf_counter() - start
            report.step_done(name)
            if self.keep == "last" and not store.info(name).get("alias"):
                # the step just written was the only reader of its input's images
                source = store.info(prev).get("alias") or prev
                if source != INPUT:
                    store.discard(source, [channel_key(ch) for ch in cfg.channels])
            prev = name

    def _start_scheduler(self, stack: contextlib.ExitStack, todo: list[str]) -> bool:
        """Enter the run's scheduler on ``stack``; True for ``distributed``.

        With threads, the worker processes of the steps in ``todo`` that use them start now,
        in the background, while the first steps compute (their fork server takes ~0.3 s).
        """
        cfg = self.config
        distributed = stack.enter_context(scheduler(self.cluster, nproc=cfg.nproc, folder=self.output_dir))
        if not distributed and any(get_step(name).uses_processes(cfg.step_params[name]) for name in todo):
            processes.pool()
        return distributed

    @staticmethod
    def _recompute_discarded(store: ProjectStore, todo: list[str], chains: list[str], force: set[str]) -> set[str]:
        """Steps to redo because the first step to compute reads images discarded by ``keep='last'``."""
        first = None
        for i, (name, chain) in enumerate(zip(todo, chains)):
            info = store.info(name)
            if name in force or info is None or info.get("hash") != chain or not info.get("complete"):
                first = i
                break
        if first is None:
            return set()
        start = first
        while start > 0 and _discarded(store, todo[start - 1]):
            start -= 1
        return {todo[start]} if start < first else set()

    def _run_step(self, store: ProjectStore, step, params, prev: str, chain: str, distributed: bool,
                  target: str) -> int:
        """Write ``step``'s result, statistics and state into the group ``target``; the slices computed."""
        cfg = self.config
        name = step.name
        prev_info = store.info(prev)
        zpos_in = None if prev_info.get("zpos") is None else np.asarray(prev_info["zpos"], float)
        store.set_info(target, hash=chain, complete=False, input=prev, params=_jsonable(params))
        previous = self._previous_states(store, name)
        inputs = {ch: store.lazy(store.node(prev, ch)) for ch in cfg.channels}
        ctxs = {ch: self._ctx(ch, zpos_in, distributed, previous.get(ch, {}),
                              store.stats(store.node(prev, ch))[:, 3:6]) for ch in cfg.channels}
        states = {}
        for ch in _state_order(step, params, cfg):
            key = _state_key(step, cfg, ch)
            if key in states:
                continue
            state = store.load_state(target, key)
            if state is None:
                with state_progress(f"{name} (state)", quiet=self.quiet, distributed=distributed):
                    state = step.state(inputs[ch], params, ctxs[ch])
                store.save_state(target, key, state)
            states[key] = state
        tasks, total, zpos_out, alias, units = [], 0, zpos_in, None, {}
        for ch in cfg.channels:
            state = states[_state_key(step, cfg, ch)]
            if "zpos" in state:
                zpos_out = np.asarray(state["zpos"], float)
            x = inputs[ch]
            out = step.apply(x, params, state, ctxs[ch])
            if out is None:  # images unchanged: the result is the previous step's array
                alias = (prev_info.get("alias") or prev)
                continue
            # the input's layout: chunks of cz slices, shards of sz
            cz, sz = x.chunks[0][0], store.shard_slices(store.node(prev, ch))
            out = out.rechunk((cz, -1, -1))
            reduction = extra = None
            if step.write_reduction is not None:
                reduction = step.write_reduction(state)
                probe = reduction(np.zeros((1,) + out.shape[1:], x.dtype))
                extra = (probe.shape[1], probe.dtype)
            node = store.create_result(target, ch, out.shape, cz, x.dtype, extra=extra, shard=sz)
            new, n = _write_tasks(out.to_delayed().ravel(), out.shape[0], cz, sz, store.done_units(node),
                                  str(store.path), node, key=f"{name}-{channel_key(ch)}", dtype=x.dtype,
                                  reduction=reduction)
            tasks += new
            total += n
            units = _units(cz, sz)
        execute(tasks, total=total, desc=name, distributed=distributed, quiet=self.quiet, **units)
        store.set_info(target, complete=True, alias=alias,
                       zpos=None if zpos_out is None else np.asarray(zpos_out).tolist())
        return total

    def _previous_states(self, store: ProjectStore, name: str) -> dict[str, dict]:
        """States of the earlier steps that ``name`` requires, per channel (shared states under every channel).

        Only those: loading every earlier state for every step read the store's states n²/2 times.
        """
        out: dict[str, dict] = {ch: {} for ch in self.config.channels}
        required = get_step(name).requires
        for earlier in self.config.process_steps[: self.config.process_steps.index(name)]:
            if earlier not in required:
                continue
            step = get_step(earlier)
            for ch in self.config.channels:
                state = store.load_state(earlier, _state_key(step, self.config, ch))
                if state is not None:
                    out[ch][earlier] = state
        return out

    def _ctx(self, channel: str, zpos, distributed: bool, previous: dict, input_stats) -> StepContext:
        return StepContext(channel=channel, zpos=zpos, nproc=self.config.nproc, distributed=distributed,
                           first_index=self.config.ind_min, previous=previous, input_stats=input_stats)


def _check_mib(key: str, value: Any, *, zero: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and (value > 0 or (zero and value == 0))):
        raise ConfigError(f"{key} = {value!r} is invalid: expected a finite number of MiB {'>=' if zero else '>'} 0.")


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, DiskFullError) or getattr(exc, "errno", None) == errno.ENOSPC


def _zpos_change(info: dict, zpos: np.ndarray | None) -> list[str]:
    """The input z positions differ from those stored at ingest (a new policy or [metadata] zpos).

    Positions found where the ingest had none are no change: nothing was computed from them.
    """
    stored = info.get("zpos")
    if zpos is None or stored is None or (len(stored) == len(zpos) and np.allclose(stored, zpos)):
        return []
    return ["the z positions of the slices (file names through the policy, or [metadata] zpos)"]


def _channel_label(channel: str, metadata: dict | None, project_dir: Path) -> str:
    """A channel's name in an export: its folder, or its detector for the project folder itself."""
    if channel != ".":
        return channel
    detector = None if metadata is None else (metadata.get("detector") or {}).get(channel)
    return detector or project_dir.name


def _discarded(store: ProjectStore, step: str) -> bool:
    """True when the images of ``step`` (or of the step it aliases) were discarded (``keep='last'``)."""
    info = store.info(step) or {}
    return bool((store.info(info.get("alias") or step) or {}).get("discarded"))


def _read_block(part: ChannelSource) -> Block:
    # ``part`` holds this chunk's slices only (``ChannelSource.part``): a task carrying every
    # file name cost dask ~8 ms per 1 000 files to build, quadratic in the slices.
    return prepare_block(read_slices(part, 0, part.nslices), dtype=part.dtype)


def _write_tasks(blocks: Sequence[Delayed], nz: int, cz: int, sz: int | None, done: np.ndarray, store_path: str,
                 node: str, *, key: str, dtype: Any = None, reduction: Callable | None = None
                 ) -> tuple[list[Delayed], int]:
    """One write task per shard not ``done`` (per chunk when unsharded), and the slices they write.

    ``blocks`` are the ``nz`` slices' chunks of ``cz`` slices, in order (the last one may be short).  A
    shard's chunks are cast in the tasks that compute them (``dtype`` given: raw step
    output) and gathered by the shard's task, the only one to write the shard's files.
    """
    k = (sz or cz) // cz
    tasks, total = [], 0
    for u in np.flatnonzero(~done).tolist():
        parts = list(blocks[u * k : (u + 1) * k])
        if dtype is not None and len(parts) > 1:
            parts = [dask.delayed(prepare_block)(p, dtype=dtype, reduction=reduction,
                                                  dask_key_name=f"cast-{key}-{u * k + j}")
                     for j, p in enumerate(parts)]
        start = u * k * cz
        tasks.append(dask.delayed(write_block)(parts, store_path, node, start, reduction,
                                                dask_key_name=f"write-{key}-{u}"))
        total += min(start + k * cz, nz) - start
    return tasks, total


def _units(cz: int, sz: int | None) -> dict[str, Any]:
    """What a write task writes, for :func:`~pystack3d_dask.progress.execute`."""
    return {"unit": "chunk" if sz is None else "shard", "chunks_per_task": (sz or cz) // cz}


def _shards(sz: int | None) -> str:
    return "unsharded" if sz is None else f"shards of {sz} slices"


def _state_order(step, params, cfg: ProjectConfig) -> list[str]:
    """Channels whose state is computed: the reference channel only for shared states."""
    if not step.shared_state:
        return list(cfg.channels)
    ref = getattr(params, "reference_channel", None) or cfg.channels[0]
    if ref not in cfg.channels:
        raise ConfigError(f"[{step.name}] reference_channel = {ref!r} is invalid: expected one of "
                          f"{list(cfg.channels)}.")
    return [ref]


def _state_key(step, cfg: ProjectConfig, channel: str) -> str:
    return "_shared" if step.shared_state else channel_key(channel)


def _jsonable(params: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(params), default=str))
