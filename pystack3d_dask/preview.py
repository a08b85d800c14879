"""Parameter preview: one step on a few sampled slices, for each value of a parameter grid.

``preview(project, "destriping", slices=5, settings=["filters[0].noise_level=50,100,200"])``
reads a few evenly spaced slices of the step's input (the previous step's
stored result, or the input TIFFs when nothing is stored yet), runs the step
on them with each combination of values, and writes beside the report a
contact sheet, ``preview_<step>.html`` (the slices before, then after for
each value), and the step's own measures (``preview_<step>.json``).  It
never writes to the store: users pick parameters with it before a long run.

A setting is ``KEY=V1,V2,...``: ``KEY`` is a key of the step's table, with
``[i]`` and ``.name`` to reach inside lists and tables
(``filters[0].noise_level``, ``area``, ``wavelet_decomposition.sigma``);
each value is a TOML value (``[0, 100, 0, 80]``, ``"HuberT"``, ``1e-2``), a
bare word being a string.  Every combination is checked like the TOML,
before any work.

Steps whose state spans the whole stack (a 3-D background, a reference
histogram, the median of area means) fit it on the sample: close to, not
equal to, the run's.  ``registration_calculation`` registers each sampled
slice on the slice before it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from pystack3d_dask import quality
from pystack3d_dask.config import suggest
from pystack3d_dask.errors import ConfigError
from pystack3d_dask.report import REPORT_DIR
from pystack3d_dask.report import html as page_html
from pystack3d_dask.report.figures import image
from pystack3d_dask.report.images import display_range
from pystack3d_dask.steps import get_step
from pystack3d_dask.steps.base import run_step
from pystack3d_dask.store import INPUT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: the steps a sample of slices can stand for (the others need every slice's state)
STEPS = ("cropping", "bkg_removal", "intensity_rescaling", "intensity_rescaling_area", "registration_calculation",
         "destriping", "cropping_final")
#: most runs one preview makes (the product of the settings' value counts)
MAX_RUNS = 24
_KEY = re.compile(r"^[A-Za-z_]\w*(\[\d+\])*(\.[A-Za-z_]\w*(\[\d+\])*)*$")
_PART = re.compile(r"([A-Za-z_]\w*)|\[(\d+)\]")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One ``KEY=V1,V2,...``: where the value goes and the values to try."""

    key: str
    path: tuple[str | int, ...]
    values: tuple[Any, ...]


def parse_setting(text: str) -> Setting:
    """Parse ``KEY=V1,V2,...`` (see the module docstring), or raise :class:`ConfigError`."""
    key, sep, rest = text.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key) or not rest.strip():
        raise ConfigError(f"--set {text!r} is invalid: expected KEY=V1,V2,... e.g. filters[0].noise_level=50,100,200.")
    values = []
    for item in _split_values(rest):
        try:
            values.append(tomllib.loads(f"v = {item}")["v"])
        except tomllib.TOMLDecodeError:
            if not re.fullmatch(r"[\w.+-]+", item):
                raise ConfigError(f"--set {text!r}: {item!r} is not a TOML value (quote strings, write lists "
                                  "as [a, b]).") from None
            values.append(item)  # a bare word: a string
    path = tuple(int(index) if index else name for name, index in _PART.findall(key))
    return Setting(key=key, path=path, values=tuple(values))


def _split_values(text: str) -> list[str]:
    """Split on the commas outside brackets and quotes."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    items.append(text[start:].strip())
    return [item for item in items if item]


def _assign(table: dict, setting: Setting, value: Any, section: str) -> None:
    """Set ``value`` at ``setting.path`` inside ``table`` (plain lists and dicts, as from JSON)."""
    node: Any = table
    for i, part in enumerate(setting.path):
        where = _path_text(setting.path[: i + 1])
        if isinstance(node, list) and not (isinstance(part, int) and part < len(node)):
            raise ConfigError(f"--set {setting.key}: [{section}] {_path_text(setting.path[:i])} has {len(node)} "
                              f"entries (indices 0 to {len(node) - 1}).")
        if isinstance(node, dict) and not isinstance(part, str):
            raise ConfigError(f"--set {setting.key}: [{section}] {_path_text(setting.path[:i])} is a table, "
                              "not a list.")
        if i == len(setting.path) - 1:
            node[part] = value
            return
        if isinstance(node, dict) and node.get(part) is None:
            node[part] = {}  # a table the step may take, e.g. wavelet_decomposition.sigma
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {setting.key}: [{section}] {where} is {node!r}, not a list or table.")


def _path_text(path: Sequence[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _grid(base: Any, settings: Sequence[Setting], section: str) -> list[tuple[str, dict]]:
    """``(label, table)`` for every combination of the settings' values, each checked like the TOML."""
    runs = int(np.prod([len(s.values) for s in settings])) if settings else 1
    if runs > MAX_RUNS:
        raise ConfigError(f"--set gives {runs} combinations: at most {MAX_RUNS} (fewer values per key).")
    step = get_step(section)
    out = []
    for combo in itertools.product(*(s.values for s in settings)):
        table = json.loads(json.dumps(dataclasses.asdict(base)))  # plain lists and dicts, deep-copied
        for setting, value in zip(settings, combo):
            _assign(table, setting, value, section)
        try:
            step.params(table)
        except ConfigError as exc:
            raise ConfigError(f"--set: {exc}") from None
        label = ", ".join(f"{s.key}={json.dumps(v)}" for s, v in zip(settings, combo)) or "as in the TOML"
        out.append((label, table))
    return out


# -- measures: one number per sampled slice, smaller is better unless said ----------------------------
def _stripes(before: np.ndarray, after: np.ndarray, params: Any, extra: dict) -> dict[str, np.ndarray]:
    return {"stripe power after / before": np.asarray(quality.stripe_power(np.nan_to_num(after)))
            / np.maximum(quality.stripe_power(np.nan_to_num(before)), 1e-12)}


def _trend(before: np.ndarray, after: np.ndarray, params: Any, extra: dict) -> dict[str, np.ndarray]:
    lo, hi = params.threshold_min, params.threshold_max

    def left(stack):
        return np.array([quality.trend_rms(img, (img >= (lo if lo is not None else -np.inf))
                                           & (img <= (hi if hi is not None else np.inf))) for img in stack])
    return {"trend left (grey levels)": left(after), "trend before": left(before)}


def _registration(before: np.ndarray, after: np.ndarray, params: Any, extra: dict) -> dict[str, np.ndarray]:
    out = {"residual shift (px)": extra["residual"]}
    if extra.get("confidence") is not None:
        out["pair confidence (higher is better)"] = extra["confidence"]
    return out


def _spread(before: np.ndarray, after: np.ndarray, params: Any, extra: dict) -> dict[str, np.ndarray]:
    def spread(stack):
        means = np.nanmean(stack.reshape(stack.shape[0], -1), axis=1)
        return np.full(stack.shape[0], np.std(means) / max(abs(np.mean(means)), 1e-12))
    return {"spread of slice means after": spread(after), "before": spread(before)}


MEASURES: dict[str, Callable[[np.ndarray, np.ndarray, Any, dict], dict[str, np.ndarray]]] = {
    "destriping": _stripes,
    "bkg_removal": _trend,
    "registration_calculation": _registration,
    "intensity_rescaling": _spread,
    "intensity_rescaling_area": _spread,
}


@dataclasses.dataclass
class PreviewResult:
    """What a preview computed."""

    #: the contact sheet
    page: Path
    #: indices of the sampled slices in the step's input
    slices: list[int]
    #: per combination label, per measure, the mean over the sampled slices
    measures: dict[str, dict[str, float]]
    seconds: float


def preview(
    project, step: str, *, slices: int | Sequence[int] = 5, settings: Sequence[str | Setting] = (), channel: str | None = None,
    folder: str | os.PathLike | None = None,
) -> PreviewResult:
    """Run ``step`` on ``slices`` sampled slices for each combination of ``settings``; write a contact sheet.

    Parameters
    ----------
    project : Project
    step : str
        One of :data:`STEPS`, among the project's ``process_steps``.
    slices : int or sequence of int
        How many evenly spaced slices to sample, or which (e.g. a curtained one); for
        registration, the pairs ending at them.
    settings : sequence of str or Setting
        ``KEY=V1,V2,...`` each; every combination runs.
    channel : str, optional
        Default: the first channel.
    folder : path, optional
        Default: the report folder beside the store.

    Raises
    ------
    ConfigError
        An unknown or unsupported step, a bad setting or value (before any work).
    StoreError
        The step's input is not stored yet (other than the input images).
    """
    start = time.perf_counter()
    cfg = project.config
    if step not in cfg.process_steps:
        raise ConfigError(f"step {step!r} is not in process_steps{suggest(step, cfg.process_steps)}: "
                          f"{list(cfg.process_steps)}.")
    if step not in STEPS:
        raise ConfigError(f"step {step!r} needs every slice of the stack: the preview runs {', '.join(STEPS)}.")
    if isinstance(slices, bool) or not isinstance(slices, (int, Sequence)) or (
            isinstance(slices, int) and slices < 1) or (not isinstance(slices, int) and not slices):
        raise ConfigError(f"slices = {slices!r} is invalid: expected a count >= 1 or a list of slice indices.")
    channel = channel or cfg.channels[0]
    if channel not in cfg.channels:
        raise ConfigError(f"channel = {channel!r} is invalid: expected one of {list(cfg.channels)}.")
    parsed = [s if isinstance(s, Setting) else parse_setting(s) for s in settings]
    runs = _grid(cfg.step_params[step], parsed, step)
    source, before_name, sample, idx = _sample(project, step, channel, slices)
    spec = get_step(step)
    rows, measures = [], {}
    for label, table in runs:
        out, extra = _run(spec, sample, table, step)
        values = MEASURES[step](_reference(sample, step), out, spec.params(table), extra) if step in MEASURES else {}
        measures[label] = {k: float(np.nanmean(v)) for k, v in values.items()}
        rows.append((label, out, values))
    folder = Path(folder) if folder is not None else project.store_path.parent / REPORT_DIR
    page = _write_sheet(folder, step, channel, before_name, source, idx, sample, rows, measures,
                        time.perf_counter() - start)
    return PreviewResult(page=page, slices=[int(k) for k in idx], measures=measures,
                         seconds=time.perf_counter() - start)


def _sample(project, step: str, channel: str, count: int | Sequence[int]) -> tuple[str, str, np.ndarray, np.ndarray]:
    """The sampled slices of ``step``'s input: (where from, its name, ``(n, y, x)`` or pairs, indices)."""
    steps = (INPUT,) + tuple(project.config.process_steps)
    before = steps[steps.index(step) - 1]
    pairs = step == "registration_calculation"
    if before == INPUT and not project.store_path.exists():
        from pystack3d_dask.io.tiff import discover, read_slices

        cfg = project.config
        source = discover(cfg.project_dir, [channel], ind_min=cfg.ind_min, ind_max=cfg.ind_max)[0]
        idx = _indices(source.nslices, count, pairs)
        read = [read_slices(source, int(k) - 1, int(k) + 1) if pairs else read_slices(source, int(k), int(k) + 1)
                for k in idx]
        return f"the input images in {cfg.project_dir}", before, np.concatenate(read), idx
    stack = project.result(before, channel)
    idx = _indices(stack.shape[0], count, pairs)
    take = np.ravel([(k - 1, k) for k in idx]) if pairs else idx
    return f"the stored result of {before}", before, np.asarray(stack[take].compute()), idx


def _indices(nz: int, slices: int | Sequence[int], pairs: bool) -> np.ndarray:
    """The slices sampled: ``slices`` evenly spaced ones, or those given (checked against ``nz``)."""
    first = 1 if pairs else 0
    if nz <= first:
        raise ConfigError(f"the stack has {nz} slice(s): nothing to preview.")
    if isinstance(slices, int):
        return np.unique(np.linspace(first, nz - 1, min(slices, nz - first)).round().astype(int))
    for k in slices:
        if isinstance(k, bool) or not isinstance(k, int) or not first <= k < nz:
            raise ConfigError(f"slices: {k!r} is invalid: expected slice indices from {first} to {nz - 1}"
                              + (" (registration pairs end at a slice >= 1)" if pairs else "") + ".")
    return np.unique(np.asarray(slices, int))


def _reference(sample: np.ndarray, step: str) -> np.ndarray:
    """The slices a measure compares with: each pair's moving slice for registration."""
    return sample[1::2] if step == "registration_calculation" else sample


def _run(spec, sample: np.ndarray, table: dict, step: str) -> tuple[np.ndarray, dict]:
    """The step on the sample: ``(after, extra)``; registration: each pair's moving slice registered."""
    if step == "bkg_removal" and len(table.get("skip_factors", ())) == 3:
        table = {**table, "skip_factors": [*table["skip_factors"][:2], 1]}  # the sample is the z subsampling
    if step != "registration_calculation":
        out, _ = run_step(spec, sample, **table)
        return np.asarray(out.compute()), {}
    from pystack3d_dask.kernels.warp import warp_affine

    moved, residual, confidence = [], [], []
    for ref, mov in zip(sample[0::2], sample[1::2]):
        _, state = run_step(spec, np.stack([ref, mov]), **table)
        matrix = np.asarray(state["matrices"], np.float64).reshape(2, -1, 3, 3)[1, 0]
        warped = warp_affine(mov, matrix, mode="edge")
        moved.append(warped)
        residual.append(float(np.hypot(*quality.shift(ref, warped))))
        if "confidence" in state:
            confidence.append(float(np.min(np.asarray(state["confidence"], np.float64).reshape(2, -1)[1])))
    return np.stack(moved), {"residual": np.array(residual),
                             "confidence": np.array(confidence) if confidence else None}


def _write_sheet(folder: Path, step: str, channel: str, before_name: str, source: str, idx: np.ndarray,
                 sample: np.ndarray, rows: list, measures: dict, seconds: float) -> Path:
    """The contact sheet: sampled slices before, then after for each combination, with the measures."""
    pairs = step == "registration_calculation"
    if pairs:  # what registration changes: the difference with the reference slice
        refs = sample[0::2].astype(np.float32)
        shown_before = np.abs(sample[1::2].astype(np.float32) - refs)
        rows = [(label, np.abs(np.nan_to_num(out) - refs), values) for label, out, values in rows]
    else:
        shown_before = sample
    ranges = [display_range(shown_before[j], *(out[j] for _, out, _ in rows if out.shape[1:] == sample.shape[1:]))
              for j in range(len(idx))]
    names = sorted({k for _, _, values in rows for k in values})
    what = "|slice k - slice k-1|" if pairs else "slice"
    header = ["", *(f"{what}, k = {k}" for k in idx), *names]

    def cells(stack, label):
        return [image(stack[j], f"{label} {k}", lo=ranges[j][0] if stack.shape[1:] == sample.shape[1:] else None,
                      hi=ranges[j][1] if stack.shape[1:] == sample.shape[1:] else None) for j, k in enumerate(idx)]
    table_rows = [["<b>before</b>", *cells(shown_before, "before"), *("" for _ in names)]]
    for label, out, values in rows:
        table_rows.append([escape(label), *cells(out, label),
                           *(f'<span class="n">{np.nanmean(values[n]):.4g}</span>' if n in values else ""
                             for n in names)])
    intro = (f"<p>{escape(step)} on {len(idx)} slices of {escape(source)} (channel {escape(channel)}), "
             f"{len(rows)} parameter set(s), {seconds:.1f} s. Measures are means over the sampled slices. "
             "Nothing was written to the store.</p>")
    text = page_html.page(title=f"preview: {step}", summary=intro + page_html.table(header, table_rows),
                          sections=[])
    page_html.write_atomic(folder / f"preview_{step}.json", json.dumps(
        {"step": step, "channel": channel, "input": before_name, "slices": [int(k) for k in idx],
         "measures": measures}, indent=1))
    return page_html.write_atomic(folder / f"preview_{step}.html", text)
