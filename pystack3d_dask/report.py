"""Figures of a run: per-slice statistics, each step's state, cut-planes of a result.

Matplotlib only (Agg backend, PNG files); nothing here computes a correction.
Every function takes a :class:`~pystack3d_dask.engine.Project` and writes its
figures under ``folder`` (default: ``<store>/../pystack3d_dask_report``),
returning the paths written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPORT_DIR = "pystack3d_dask_report"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_stats(project, step: str, channel: str, folder: Path) -> Path:
    """min / max / mean of the input, the raw result and the result, against the slice index."""
    plt = _plt()
    stats = project.stats(step, channel)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharex=True)
    for ax, name in zip(axes, ("min", "max", "mean")):
        if f"input_{name}" in stats and len(stats[f"input_{name}"]) == len(stats[name]):
            ax.plot(stats[f"input_{name}"], label="input", lw=1)
        ax.plot(stats[f"raw_{name}"], label="raw result", lw=1, ls="--")
        ax.plot(stats[name], label="result", lw=1)
        ax.set_title(name)
        ax.set_xlabel("slice")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{step} - {channel}: per-slice statistics")
    return _save(fig, folder / f"{step}_{_tag(channel)}_stats.png")


def plot_state(project, step: str, channel: str, folder: Path) -> list[Path]:
    """The step's own figure: coefficients, histograms, factors, matrices or z positions."""
    state = None if step == "input" else project.state(step, channel)
    if not state:
        return []
    plt = _plt()
    tag = _tag(channel)
    if step == "bkg_removal":
        coefs = np.atleast_2d(np.asarray(state["coefs"]))
        fig, ax = plt.subplots(figsize=(7, 3.4))
        if coefs.shape[0] == 1:
            ax.bar(state["terms"], coefs[0])
        else:
            for name, series in zip(state["terms"], coefs.T):
                ax.plot(series, label=name, lw=1)
            ax.set_xlabel("slice")
            ax.legend(fontsize=7, ncol=4)
        ax.set_title("background coefficients")
        return [_save(fig, folder / f"{step}_{tag}_coefs.png")]
    if step == "intensity_rescaling":
        maps = [(k, state[k]) for k in ("histograms", "reference", "histograms_after") if k in state]
        fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 3.6), squeeze=False)
        edges = np.asarray(state["edges"])
        for ax, (name, table) in zip(axes[0], maps):
            ax.imshow(np.log1p(np.asarray(table, float)), aspect="auto", origin="lower",
                      extent=(edges[0], edges[-1], 0, len(table)))
            ax.set_title(name)
            ax.set_xlabel("grey level")
            ax.set_ylabel("slice")
        return [_save(fig, folder / f"{step}_{tag}_histograms.png")]
    if step == "intensity_rescaling_area":
        fig, ax = plt.subplots(figsize=(7, 3.4))
        ax.plot(state["factors"], lw=1)
        ax.set_xlabel("slice")
        ax.set_title("rescaling factor")
        return [_save(fig, folder / f"{step}_{tag}_factors.png")]
    if step in ("registration_calculation", "registration_transformation"):
        key = "matrices" if step == "registration_calculation" else "cumulative"
        mats = np.asarray(state[key])
        mats = mats.reshape(mats.shape[0], -1, 3, 3)[:, 0]  # first block when nb_blocks > 1
        fig, ax = plt.subplots(figsize=(7, 3.4))
        ax.plot(mats[:, 0, 2], label="tx (px)", lw=1)
        ax.plot(mats[:, 1, 2], label="ty (px)", lw=1)
        flagged = np.flatnonzero(state.get("outliers", []))  # pairs far from their neighbours'
        if flagged.size:
            ax.plot(flagged, mats[flagged, 0, 2], "rx", label="outlier pair")
            ax.plot(flagged, mats[flagged, 1, 2], "rx")
        ax.set_xlabel("slice")
        ax.set_title("pairwise translations" if key == "matrices" else "cumulative translations")
        ax.legend(fontsize=8)
        return [_save(fig, folder / f"{step}_{tag}_{key}.png")]
    if step == "resampling":
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        for name in ("zpos_in", "zpos"):
            z = np.asarray(state[name])
            axes[0].plot(z, ".", ms=2, label=name)
            axes[1].plot(np.diff(z), lw=1, label=name)
        axes[0].set_title("z positions")
        axes[1].set_title("z increments")
        axes[0].legend(fontsize=8)
        return [_save(fig, folder / f"{step}_{tag}_zpos.png")]
    return []


def plot_cuts(project, step: str, channel: str, folder: Path) -> Path:
    """The three cut-planes through the centre of a step's result (z-y-x), read lazily."""
    plt = _plt()
    stack = project.result(step, channel)
    nz, ny, nx = stack.shape
    xy, xz, yz = (np.asarray(p.compute()) for p in (stack[nz // 2], stack[:, ny // 2], stack[:, :, nx // 2]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, img, title in zip(axes, (xy, xz, yz), (f"XY (slice {nz // 2})", "XZ", "YZ")):
        ax.imshow(img, cmap="gray", aspect="auto")
        ax.set_title(title)
    fig.suptitle(f"{step} - {channel}")
    return _save(fig, folder / f"{step}_{_tag(channel)}_cuts.png")


def plot_step(project, step: str, *, channel: str | None = None,
              folder: str | os.PathLike | None = None) -> list[Path]:
    """Every figure of one step (statistics, state, cut-planes) for one or every channel."""
    folder = Path(folder) if folder is not None else project.store_path.parent / REPORT_DIR
    channels = [channel] if channel else list(project.config.channels)
    paths = []
    for ch in channels:
        paths.append(plot_stats(project, step, ch, folder))
        paths += plot_state(project, step, ch, folder)
        if project.has_images(step):
            paths.append(plot_cuts(project, step, ch, folder))
    return paths


def _tag(channel: str) -> str:
    return "root" if channel == "." else channel
