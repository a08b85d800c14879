"""The figures of one step, as HTML fragments: statistics, the step's own plots, cut-planes.

Each function returns a list of ``<figure>`` elements (SVG charts from
:mod:`.svg`, images from :mod:`.images`) built from a project's saved
statistics and state and from :class:`~.views.Views` already read: nothing
here reads images from the store.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape

import numpy as np

from pystack3d_dask.kernels.registration import cumulate
from pystack3d_dask.report.images import colour_map, data_uri, display_range, to_uint8
from pystack3d_dask.report.svg import line_chart
from pystack3d_dask.report.views import Views
from pystack3d_dask.steps import get_step

#: rows an embedded plane or table is stretched to at least (a 5-slice xz plane stays readable)
MIN_ROWS = 96


def figure(body: str, caption: str) -> str:
    """One ``<figure>`` with its caption."""
    return f"<figure>{body}<figcaption>{escape(caption)}</figcaption></figure>"


def image(img: np.ndarray, alt: str, *, lo: float | None = None, hi: float | None = None) -> str:
    """An ``<img>`` of a grey image (scaled to ``[lo, hi]``, default its own range) or an RGB uint8 one."""
    if img.ndim == 2:
        if lo is None or hi is None:
            lo, hi = display_range(img)
        img = to_uint8(img, lo, hi)
    stretch = max(1, MIN_ROWS // img.shape[0]) if img.shape[0] < MIN_ROWS <= img.shape[1] else 1
    return f'<img src="{data_uri(img, stretch=stretch)}" alt="{escape(alt)}">'


def stats_figures(stats: dict[str, np.ndarray]) -> list[str]:
    """min, max and mean per slice of the input, the raw result and the result."""
    out = []
    for name in ("min", "max", "mean"):
        series = {}
        if len(stats.get(f"input_{name}", ())) == len(stats[name]):
            series["input"] = stats[f"input_{name}"]
        series["raw result"] = stats[f"raw_{name}"]
        series["result"] = stats[name]
        out.append(line_chart(series, title=f"{name} per slice"))
    return [figure("".join(out), "Statistics along z: input, result before the dtype clip, result.")]


def cut_planes(before: Views | None, after: Views | None) -> list[str]:
    """The xy, xz and yz planes through the centre, before and after the step, on a common grey range."""
    if after is None:
        return []
    if before is after:
        return [figure("", "Images unchanged by this step (it computes a state only).")]
    rows = []
    for label, views in (("before", before), ("after", after)):
        if views is None:
            continue
        cells = []
        for plane in ("xy", "xz", "yz"):
            pair = [getattr(v, plane) for v in (before, after) if v is not None]
            lo, hi = display_range(*pair)
            cells.append(f"<div>{image(getattr(views, plane), f'{label} {plane}', lo=lo, hi=hi)}"
                         f"<span>{label} {plane}</span></div>")
        rows.append(f'<div class="planes">{"".join(cells)}</div>')
    nz, ny, nx = after.shape
    return [figure("".join(rows), f"Cut-planes through the centre: xy slice {nz // 2}, xz row {ny // 2}, "
                                  f"yz column {nx // 2} (z downwards, one row per slice).")]


def _bkg_removal(state, before, after) -> list[str]:
    coefs = np.atleast_2d(np.asarray(state["coefs"], np.float64))
    terms = list(state["terms"])
    if coefs.shape[0] == 1:  # one 3-D fit
        rows = "".join(f"<tr><td>{escape(t)}</td><td>{c:.6g}</td></tr>" for t, c in zip(terms, coefs[0]))
        return [figure(f'<table class="kv"><tr><th>term</th><th>coefficient</th></tr>{rows}</table>',
                       "Background polynomial fitted over the stack (coordinates normalised to [0, 1]).")]
    chart = line_chart(dict(zip(terms, coefs.T)), title="background coefficients")
    return [figure(chart, "Background polynomial fitted on each slice (coordinates normalised to [0, 1]).")]


def _intensity_rescaling(state, before, after) -> list[str]:
    edges = np.asarray(state["edges"], np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    key = get_step("intensity_rescaling").write_reduction_key
    tables = [(name, np.asarray(state[k], np.float64)) for name, k in
              (("before", "histograms"), ("reference", "reference"), ("after", key)) if k in state]
    cells = "".join(f"<div>{image(colour_map(t), name)}<span>{name}</span></div>" for name, t in tables)
    sums = {name: (centres, t.sum(axis=0) / max(t.sum(), 1)) for name, t in tables if name != "reference"}
    return [figure(f'<div class="planes">{cells}</div>',
                   f"Histograms along z (one row per slice, log counts; grey levels {edges[0]:.4g} to "
                   f"{edges[-1]:.4g} from left to right)."),
            figure(line_chart(sums, title="histogram of the stack", xlabel="grey level"),
                   "Histogram of the whole stack before and after matching.")]


def _intensity_rescaling_area(state, before, after) -> list[str]:
    return [figure(line_chart({"factor": state["factors"]}, title="rescaling factor")
                   + line_chart({"area mean": state["means"]}, title="area mean before"),
                   f"Per-slice factor = median of the area means ({float(state['median']):.4g}) / area mean.")]


def _flagged(state, n: int) -> np.ndarray:
    """Indices of the pairs the registration flagged as outliers (none when the state has no flags)."""
    flags = state.get("outliers")
    if flags is None:
        return np.zeros(0, int)
    flags = np.asarray(flags)
    return np.flatnonzero(flags) if flags.dtype == bool and flags.size == n else flags.astype(int).ravel()


def _translations(mats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mats = mats.reshape(mats.shape[0], -1, 3, 3)[:, 0]  # the first block when nb_blocks > 1
    return mats[:, 0, 2], mats[:, 1, 2]


def _registration_calculation(state, before, after) -> list[str]:
    pairwise = np.asarray(state["matrices"], np.float64)
    tx, ty = _translations(pairwise)
    cx, cy = _translations(cumulate(pairwise))
    flagged = _flagged(state, len(tx))
    marks = [(k, v, f"pair {k - 1}-{k}: {axis} = {v:.3g} px (flagged)")
             for k in flagged for axis, v in (("tx", tx[k]), ("ty", ty[k]))]
    charts = [line_chart({"tx": tx, "ty": ty}, title="pairwise translation (px)", marks=marks),
              line_chart({"tx": cx, "ty": cy}, title="cumulative translation (px)",
                         marks=[(k, cx[k], f"slice {k}: after flagged pair {k - 1}-{k}") for k in flagged])]
    if "confidence" in state:
        conf = np.asarray(state["confidence"], np.float64).reshape(len(tx), -1).min(axis=1)  # worst block
        charts.append(line_chart({"confidence": conf}, title="pair confidence",
                                 marks=[(k, conf[k], f"pair {k - 1}-{k} (flagged)") for k in flagged]))
    caption = (f"{state.get('transformation', '')} registration of each slice on the previous one; "
               "cumulative C[k] = M[k] @ C[k-1].")
    if len(flagged):
        caption += f" Flagged pairs (circled): {', '.join(f'{k - 1}-{k}' for k in flagged)}."
    return [figure("".join(charts), caption)]


def _registration_transformation(state, before, after) -> list[str]:
    cx, cy = _translations(np.asarray(state["cumulative"], np.float64))
    caption = "Translation applied to each slice (after drift and running-mean removal, if asked)."
    if state.get("crop") is not None:
        caption += f" Crop to the area never reached by the border: {list(state['crop'])}."
    return [figure(line_chart({"tx": cx, "ty": cy}, title="applied translation (px)"), caption)]


def _destriping(state, before, after) -> list[str]:
    if before is None or after is None:
        return []
    out = [figure(line_chart({"before": before.stripes, "after": after.stripes}, title="stripe power"),
                  "Stripe power per slice (energy of the high-pass filtered column means).")]
    k = before.most_striped
    if k in after.slices:
        pair = before.slices[k], after.slices[k]
        lo, hi = display_range(*pair)
        removed = pair[0].astype(np.float32) - pair[1].astype(np.float32)
        cells = "".join(f"<div>{body}<span>{label}</span></div>" for body, label in (
            (image(pair[0], "before", lo=lo, hi=hi), "before"), (image(pair[1], "after", lo=lo, hi=hi), "after"),
            (image(removed, "removed"), "removed (before - after)")))
        out.append(figure(f'<div class="planes">{cells}</div>',
                          f"The most curtained slice of the input, {k}, before and after."))
    return out


def _resampling(state, before, after) -> list[str]:
    zin, zout = np.asarray(state["zpos_in"], np.float64), np.asarray(state["zpos"], np.float64)
    return [figure(line_chart({"in": zin, "out": zout}, title="z positions", ylabel="z", dots=True)
                   + line_chart({"in": np.diff(zin), "out": np.diff(zout)}, title="z increments", ylabel="dz"),
                   f"{len(zin)} input slices resampled to {len(zout)} evenly spaced ones.")]


#: the step's own figures, from its saved state and the views before and after it
STATE_FIGURES: dict[str, Callable[[dict, Views | None, Views | None], list[str]]] = {
    "bkg_removal": _bkg_removal,
    "intensity_rescaling": _intensity_rescaling,
    "intensity_rescaling_area": _intensity_rescaling_area,
    "registration_calculation": _registration_calculation,
    "registration_transformation": _registration_transformation,
    "destriping": _destriping,
    "resampling": _resampling,
}
