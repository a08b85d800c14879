"""Line charts as inline SVG text: the report's plots.

A chart is a few hundred bytes of text built in well under a millisecond, where
a matplotlib figure costs 0.3-0.7 s to draw on a loaded 2-core machine (about
as long as a light step), and it stays sharp at any zoom.  Each point of a
marked series carries a tooltip (``<title>``) with its coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

import numpy as np

#: series colours (colour-blind safe, Okabe & Ito)
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")
#: above this many points a series is drawn as the min and max of each of MAX_BUCKETS buckets
MAX_BUCKETS = 1000

Series = Mapping[str, "np.ndarray | tuple[np.ndarray, np.ndarray]"]


def nice_ticks(lo: float, hi: float, *, count: int = 5) -> np.ndarray:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten) covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range [{lo}, {hi}] must be finite")
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / max(count - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return np.arange(math.floor(lo / step), math.ceil(hi / step) + 1) * step


def _label(value: float) -> str:
    return f"{value:.4g}" if value != 0 else "0"


def _decimate(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The min and max of each bucket of points, in x order: keeps single-slice spikes visible.

    Vectorised over the buckets (a loop cost ~0.4 s a series at 10 000 slices); NaN is
    skipped as by ``nanargmin`` / ``nanargmax``, and a bucket without a finite value keeps
    its first point.
    """
    if x.size <= 2 * MAX_BUCKETS:
        return x, y
    edges = np.linspace(0, x.size, MAX_BUCKETS + 1).astype(int)
    at = edges[:-1, None] + np.arange(np.diff(edges).max())  # buckets differ by one point at most
    part = np.where(at < edges[1:, None], y[np.minimum(at, y.size - 1)], np.nan)
    nan = np.isnan(part)
    lo = np.where(nan, np.inf, part).argmin(axis=1)
    hi = np.where(nan, -np.inf, part).argmax(axis=1)
    finite = np.isfinite(part).any(axis=1)
    pairs = edges[:-1, None] + np.where(finite[:, None], np.sort(np.column_stack([lo, hi]), axis=1), 0)
    keep = pairs[np.column_stack([np.ones_like(finite), finite & (lo != hi)])]
    return x[keep], y[keep]


def line_chart(
    series: Series,
    *,
    title: str,
    xlabel: str = "slice",
    ylabel: str = "",
    marks: Sequence[tuple[float, float, str]] = (),
    dots: bool = False,
    width: int = 340,
    height: int = 190,
) -> str:
    """An SVG line chart of ``series`` (label -> y, or label -> (x, y); x defaults to the index).

    Parameters
    ----------
    series : mapping
        Non-finite values break a line.
    title, xlabel, ylabel : str
    marks : sequence of (x, y, text)
        Points circled in red, with ``text`` as their tooltip (e.g. flagged pairs).
    dots : bool
        Draw points instead of lines (e.g. z positions).
    width, height : int
        Size in CSS pixels (the chart scales with its container).
    """
    data = []
    for label, values in series.items():
        if isinstance(values, tuple):
            x, y = (np.asarray(v, np.float64).ravel() for v in values)
        else:
            y = np.asarray(values, np.float64).ravel()
            x = np.arange(y.size, dtype=np.float64)
        data.append((label, *_decimate(x, y)))
    finite_x = np.concatenate([x[np.isfinite(y)] for _, x, y in data] + [np.array([m[0] for m in marks])])
    finite_y = np.concatenate([y[np.isfinite(y)] for _, x, y in data] + [np.array([m[1] for m in marks])])
    left, right, top, bottom = 52, 10, 24, 34
    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'xmlns="http://www.w3.org/2000/svg" role="img"><title>{escape(title)}</title>',
           f'<text x="{width / 2}" y="14" class="t">{escape(title)}</text>']
    if finite_y.size == 0:
        out.append(f'<text x="{width / 2}" y="{height / 2}" class="t">no finite values</text></svg>')
        return "".join(out)
    xt = nice_ticks(float(finite_x.min()), float(finite_x.max()))
    yt = nice_ticks(float(finite_y.min()), float(finite_y.max()))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    pw, ph = width - left - right, height - top - bottom

    def px(v):
        return left + (np.asarray(v) - x0) / (x1 - x0) * pw

    def py(v):
        return top + ph - (np.asarray(v) - y0) / (y1 - y0) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="f"/>')
    for v in yt:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(v):.1f}" y2="{py(v):.1f}" class="g"/>'
                   f'<text x="{left - 4}" y="{py(v) + 3:.1f}" class="yl">{_label(v)}</text>')
    for v in xt:
        out.append(f'<text x="{px(v):.1f}" y="{top + ph + 12}" class="xl">{_label(v)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 4}" class="xl">{escape(xlabel)}</text>')
    if ylabel:
        out.append(f'<text transform="translate(11 {top + ph / 2}) rotate(-90)" class="xl">{escape(ylabel)}</text>')
    for i, (label, x, y) in enumerate(data):
        colour = PALETTE[i % len(PALETTE)]
        xs, ys = px(x), py(y)
        if dots:
            out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="1.6" fill="{colour}"/>'
                    for a, b, v in zip(xs, ys, y) if math.isfinite(v)]
        else:
            runs = np.split(np.arange(y.size), np.flatnonzero(~np.isfinite(y)))
            for run in runs:
                run = run[np.isfinite(y[run])]
                if run.size:
                    pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(xs[run], ys[run]))
                    out.append(f'<polyline points="{pts}" stroke="{colour}" class="s"/>')
        if len(data) > 1:
            lx = left + 6 + (pw / len(data)) * i
            out.append(f'<rect x="{lx:.1f}" y="{top + 3}" width="10" height="3" fill="{colour}"/>'
                       f'<text x="{lx + 13:.1f}" y="{top + 8}" class="lg">{escape(label)}</text>')
    for mx, my, text in marks:
        out.append(f'<circle cx="{px(mx):.1f}" cy="{py(my):.1f}" r="4" class="m"><title>{escape(text)}</title>'
                   "</circle>")
    out.append("</svg>")
    return "".join(out)
