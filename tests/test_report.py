"""The report page: written by every run in a process of its own, self-contained, never failing a run."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr
from conftest import REPORT_STEPS as STEPS
from conftest import demo_project, random_stack, write_params, write_slices

from pystack3d_dask.engine import Project
from pystack3d_dask.errors import StoreError
from pystack3d_dask.report import PAGE, REPORT_DIR, figures, svg, write_report, writer
from pystack3d_dask.kernels.views import split_lines, view_lines
from pystack3d_dask.quality import stripe_power
from pystack3d_dask.report.views import read_views
from pystack3d_dask.store import STORE_NAME, ProjectStore


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    toml = demo_project(tmp_path_factory.mktemp("demo"))
    run = Project(toml, quiet=True).run()
    return toml, run


def sections(page: str) -> dict[str, str]:
    parts = re.split(r'<section id="([^"]+)">', page)
    return dict(zip(parts[1::2], parts[2::2]))


def report_processes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "report.worker" in " ".join(p.cmdline())]


def test_run_writes_a_self_contained_page(demo):
    toml, run = demo
    page = (toml.parent / REPORT_DIR / PAGE).read_text()
    assert list(sections(page)) == list(STEPS)
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "figures failed" not in page
    uris = re.findall(r'src="data:image/webp;base64,([^"]+)"', page)
    assert len(uris) >= 3 * len(STEPS)
    for uri in uris:  # every embedded image is a whole WebP file
        blob = base64.b64decode(uri)
        assert blob[:4] == b"RIFF" and blob[8:12] == b"WEBP" and int.from_bytes(blob[4:8], "little") == len(blob) - 8
    assert len(page) < 2_000_000
    summary = page.split("<section")[0]
    for step in STEPS:
        assert re.search(rf'#{step}">{step}</a></td><td>complete</td><td>computed</td>', summary), step


def test_each_step_shows_its_own_figures(demo):
    toml, _ = demo
    got = sections((toml.parent / REPORT_DIR / PAGE).read_text())
    for step in STEPS:
        assert got[step].count("per slice</title>") == 3, step  # min, max, mean along z
    assert "before xy" in got["bkg_removal"] and "after yz" in got["bkg_removal"]
    assert "before xy" not in got["input"] and "after xy" in got["input"]
    assert "Images unchanged" in got["registration_calculation"]
    assert "Background polynomial fitted over the stack" in got["bkg_removal"]
    assert got["intensity_rescaling"].count('alt="before"') == 1 and 'alt="after"' in got["intensity_rescaling"]
    assert "pairwise translation (px)" in got["registration_calculation"]
    assert "cumulative translation (px)" in got["registration_calculation"]
    assert "pair confidence</title>" in got["registration_calculation"]
    assert "applied translation (px)" in got["registration_transformation"]
    assert "stripe power</title>" in got["destriping"] and "most curtained slice" in got["destriping"]
    assert "z positions</title>" in got["resampling"]
    assert "rescaling factor</title>" in got["intensity_rescaling_area"]


def test_rerun_says_skipped_and_command_rewrites(demo, capsys):
    from pystack3d_dask.cli import main

    toml, _ = demo
    Project(toml, quiet=True).run()
    folder = toml.parent / REPORT_DIR
    page = (folder / PAGE).read_text()
    assert page.count("skipped (already complete)") == len(STEPS)
    assert json.loads((folder / "run.json").read_text())["skipped"] == list(STEPS)
    (folder / PAGE).unlink()
    assert main(["report", str(toml)]) == 0
    assert capsys.readouterr().out.strip() == str(folder / PAGE)
    assert list(sections((folder / PAGE).read_text())) == list(STEPS)


def test_a_run_with_nothing_to_compute_imports_neither_dask_array_nor_scipy(demo):
    toml, _ = demo
    code = ("import sys; from pystack3d_dask.engine import Project; report = Project(sys.argv[1], quiet=True).run(); "
            "print(report.done, [m for m in ('dask.array', 'scipy.fft', 'scipy.ndimage', 'scipy.linalg', "
            "'scipy.sparse', 'pywt') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(toml)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []"


def test_a_rerun_draws_only_what_it_computed(tmp_path, monkeypatch):
    """Sections of unchanged steps are kept: a run with nothing to compute reads no image."""
    toml = demo_project(tmp_path)
    Project(toml, quiet=True).run()
    page = toml.parent / REPORT_DIR / PAGE
    first = sections(page.read_text())
    read = []
    monkeypatch.setattr(writer, "read_views", lambda stack, **kw: read.append(stack.node) or read_views(stack, **kw))
    Project(toml, quiet=True).run()
    assert read == [] and sections(page.read_text()) == first
    toml.write_text(re.sub(r"(\[cropping_final\]\narea = \[)(\d+)", lambda m: f"{m[1]}{int(m[2]) + 1}",
                           toml.read_text()))
    assert Project(toml, quiet=True).run().done == ["cropping_final"]
    again = sections(page.read_text())
    assert len(read) == 1 and again["cropping_final"] != first["cropping_final"]
    assert {s: again[s] for s in STEPS[:-1]} == {s: first[s] for s in STEPS[:-1]}


def test_results_do_not_depend_on_the_report(tmp_path, demo):
    toml, _ = demo
    other = demo_project(tmp_path)
    Project(other, quiet=True).run(plots=False)
    assert not (other.parent / REPORT_DIR).exists()
    a, b = Project(toml), Project(other)
    for step in STEPS[1:]:
        np.testing.assert_array_equal(a.result(step).compute(), b.result(step).compute())


@pytest.mark.report_process
def test_keep_last_still_shows_every_step(tmp_path):
    toml = demo_project(tmp_path)
    Project(toml, quiet=True, keep="last").run()
    got = sections((toml.parent / REPORT_DIR / PAGE).read_text())
    for step in STEPS[1:]:
        assert "figures failed" not in got[step]
    for step in ("bkg_removal", "destriping", "resampling"):  # their inputs' images are discarded now
        assert "before xy" in got[step] and "after xy" in got[step], step
    assert not Project(toml).has_images("bkg_removal")


def test_a_failing_figure_never_fails_the_run(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no ink")

    monkeypatch.setitem(figures.STATE_FIGURES, "bkg_removal", broken)
    toml = demo_project(tmp_path)
    run = Project(toml, quiet=True).run(["bkg_removal"])
    assert run.done[-1] == "bkg_removal"
    got = sections((toml.parent / REPORT_DIR / PAGE).read_text())
    assert "figures failed: RuntimeError: no ink" in got["bkg_removal"]
    assert "figures failed" not in got["cropping"] and "after xy" in got["bkg_removal"]
    assert "figures of bkg_removal failed" in caplog.text
    kept = toml.parent / REPORT_DIR / writer.SECTIONS_DIR
    assert (kept / "cropping.html").exists() and not (kept / "bkg_removal.html").exists()  # drawn again next time


@pytest.mark.report_process
def test_an_interrupted_run_writes_no_page_and_stops_the_report_process(tmp_path, monkeypatch):
    from pystack3d_dask import engine

    def interrupted(tasks, *, desc, **kwargs):
        if desc == "destriping":
            assert len(report_processes()) == 1  # drawing the earlier steps
            raise KeyboardInterrupt
        return execute(tasks, desc=desc, **kwargs)

    execute = engine.execute
    monkeypatch.setattr(engine, "execute", interrupted)
    toml = demo_project(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        Project(toml, quiet=True).run()
    assert not (toml.parent / REPORT_DIR / PAGE).exists()
    assert report_processes() == []


def test_the_report_process_draws_what_the_report_command_draws(demo, tmp_path):
    toml, _ = demo
    drawn = sections((toml.parent / REPORT_DIR / PAGE).read_text())
    again = sections(write_report(Project(toml), folder=tmp_path / "again").read_text())
    assert list(drawn) == list(STEPS) and again == drawn
    assert report_processes() == []


def test_the_report_keeps_the_views_of_two_steps_at_most(demo, tmp_path):
    toml, _ = demo
    kept = []
    report = writer.ReportWriter(Project(toml), folder=tmp_path, background=False)
    views_of = report._views_of
    report._views_of = lambda step, taken: (views_of(step, taken), kept.append(len(report._views)))
    report.finish()
    assert len(kept) == len(STEPS) and max(kept) == 2


@pytest.mark.report_process
def test_the_report_process_logs_through_the_run(tmp_path, monkeypatch, caplog):
    """A figure failing in the report's process is a warning of the run, and a note on the page."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "from pystack3d_dask.report import figures\n"
        "def broken(*args, **kwargs):\n    raise RuntimeError('no ink')\n"
        "figures.STATE_FIGURES['bkg_removal'] = broken\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    toml = demo_project(tmp_path)
    Project(toml, quiet=True).run(["bkg_removal"])
    assert "figures of bkg_removal failed: RuntimeError: no ink" in caplog.text
    got = sections((toml.parent / REPORT_DIR / PAGE).read_text())
    assert "figures failed: RuntimeError: no ink" in got["bkg_removal"] and "after xy" in got["bkg_removal"]


@pytest.mark.report_process
def test_a_run_whose_report_process_dies_draws_its_figures_itself(tmp_path, monkeypatch, caplog):
    from pystack3d_dask import engine

    def killing(tasks, *, desc, **kwargs):
        if desc == "bkg_removal":
            for process in report_processes():
                process.kill()
        return execute(tasks, desc=desc, **kwargs)

    execute = engine.execute
    monkeypatch.setattr(engine, "execute", killing)
    toml = demo_project(tmp_path)
    run = Project(toml, quiet=True).run()
    assert run.done == list(STEPS)
    assert "report: the report's process stopped (exit status -9); the figures are drawn in the run's process" in caplog.text
    got = sections((toml.parent / REPORT_DIR / PAGE).read_text())
    assert list(got) == list(STEPS) and all("figures failed" not in got[s] for s in STEPS)
    assert report_processes() == []


def test_a_script_without_a_main_guard_runs_once(tmp_path):
    """The report's process is a fresh interpreter: it does not import the calling script again."""
    toml = demo_project(tmp_path)
    script = tmp_path / "script.py"
    script.write_text("import sys\nfrom pystack3d_dask.engine import Project\nprint('started', flush=True)\n"
                      f"Project({str(toml)!r}, quiet=True).run(['cropping'])\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["started"] and out.stderr == ""
    assert "cropping" in sections((toml.parent / REPORT_DIR / PAGE).read_text())


def test_report_command_errors(tmp_path, capsys):
    from pystack3d_dask.cli import main

    write_slices(tmp_path, random_stack((3, 8, 8)))
    write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [0, 4, 0, 4]\n')
    assert main(["report", str(tmp_path)]) == 2
    assert "no store at" in capsys.readouterr().err
    with pytest.raises(StoreError):
        write_report(Project(tmp_path))


class Counted:
    """A Zarr array of ``stack`` in chunks of ``cz`` slices that counts the slices read."""

    def __init__(self, stack, cz):
        self.array = zarr.array(stack, chunks=(cz,) + stack.shape[1:])
        self.shape, self.chunks, self.read = stack.shape, self.array.chunks, 0

    def __getitem__(self, key):
        out = self.array[key]
        self.read += out.shape[0] if out.ndim == 3 else 1
        return out


@pytest.mark.parametrize("cz", [1, 7, 40])
def test_views_do_not_depend_on_chunks(cz):
    stack = random_stack((40, 30, 26), dtype="float32")
    stack[17, :, ::3] += 400  # a curtained slice
    stack[5, :4] = np.nan  # a NaN border
    views = read_views(Counted(stack, cz), slices=[3])
    np.testing.assert_array_equal(views.xz, stack[:, 15])
    np.testing.assert_array_equal(views.yz, stack[:, :, 13])
    np.testing.assert_array_equal(views.xy, stack[20])
    assert views.most_striped == 17 and set(views.slices) == {3, 17, 20}
    np.testing.assert_array_equal(views.slices[3], stack[3])
    reference = read_views(Counted(stack, 40))
    np.testing.assert_array_equal(views.stripes, reference.stripes)
    assert np.isfinite(views.stripes).all()
    # from the table a step writes: the same views, reading the kept slices only
    lines = np.concatenate([view_lines(stack[i : i + cz]) for i in range(0, 40, cz)])
    counted = Counted(stack, cz)
    from_lines = read_views(counted, lines=lines, slices=[3])
    assert counted.read == 3
    for field in ("xy", "xz", "yz", "stripes"):
        np.testing.assert_array_equal(getattr(from_lines, field), getattr(views, field))
    assert from_lines.slices.keys() == views.slices.keys()


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_view_lines(dtype):
    stack = random_stack((5, 9, 6), dtype=dtype)
    lines = view_lines(stack)
    assert lines.dtype == np.float32 and lines.shape == (5, 6 + 9 + 1)
    np.testing.assert_array_equal(lines[:, :6], stack[:, 4])
    np.testing.assert_array_equal(lines[:, 6:15], stack[:, :, 3])
    np.testing.assert_allclose(lines[:, -1], stripe_power(stack), rtol=1e-6)
    rows, columns, stripes = split_lines(lines, stack.shape)
    assert rows.shape == (5, 6) and columns.shape == (5, 9) and stripes.shape == (5,)
    with pytest.raises(ValueError, match=r"a table of shape \(5, 16\) is invalid for a stack of shape "
                                         r"\(5, 9, 7\): expected \(5, 17\)"):
        split_lines(lines, (5, 9, 7))
    with pytest.raises(ValueError, match=r"block of shape \(5, 0, 6\) is invalid"):
        view_lines(np.zeros((5, 0, 6)))


def test_view_lines_of_slices_with_nan():
    stack = random_stack((3, 8, 8), dtype="float32")
    stack[0, :2] = np.nan
    stack[1] = np.nan
    lines = view_lines(stack)
    assert np.isnan(lines[1, :-1]).all() and np.isfinite(lines[:, -1]).all()
    filled = stack[0].copy()
    filled[:2] = np.nanmean(stack[0])
    assert lines[0, -1] == pytest.approx(stripe_power(filled), rel=1e-5)


@pytest.mark.parametrize("cz", [1, 5, 24])
def test_each_step_writes_the_lines_of_its_result(tmp_path, cz):
    toml = demo_project(tmp_path)
    project = Project(toml, quiet=True, chunk_slices=cz)
    project.run(plots=False)
    for step in STEPS:
        np.testing.assert_array_equal(project.view_lines(step), view_lines(project.result(step).compute()),
                                      err_msg=step)


def test_a_result_begun_without_lines_is_drawn_from_its_images(tmp_path):
    """A step begun by a version that wrote no lines is resumed without them, and drawn all the same."""
    drawn = {}
    for how in ("with lines", "without"):
        toml = demo_project(tmp_path / how)
        Project(toml, quiet=True).run(["bkg_removal"], plots=False)
        store = ProjectStore(toml.parent / STORE_NAME)
        if how == "without":
            shutil.rmtree(store.path / "bkg_removal" / "_views")
        store.mark_undone("bkg_removal", "bkg_removal/_", [0])
        project = Project(toml, quiet=True)
        assert project.run(["bkg_removal"]).done == ["bkg_removal"]
        assert (project.view_lines("bkg_removal") is None) == (how == "without")
        assert project.info()["steps"]["bkg_removal"]["status"] == "complete"
        drawn[how] = sections((toml.parent / REPORT_DIR / PAGE).read_text())["bkg_removal"]
    assert "after xy" in drawn["without"] and drawn["without"] == drawn["with lines"]


def test_nice_ticks():
    np.testing.assert_allclose(svg.nice_ticks(0, 119), [0, 50, 100, 150])
    np.testing.assert_allclose(svg.nice_ticks(-0.013, 0.021), [-0.02, -0.01, 0, 0.01, 0.02, 0.03])
    assert len(svg.nice_ticks(5, 5)) >= 2
    with pytest.raises(ValueError, match="finite"):
        svg.nice_ticks(0, np.inf)


def test_chart_keeps_spikes_and_breaks_at_nan():
    y = np.zeros(100_000)
    y[54_321] = 9.0
    chart = svg.line_chart({"y": y}, title="t")
    assert chart.count(",") < 2 * (2 * svg.MAX_BUCKETS + 10)  # decimated
    ys = [float(p.split(",")[1]) for p in re.search(r'points="([^"]+)"', chart).group(1).split()]
    assert len(set(ys)) == 2  # the spike survives the decimation
    gap = svg.line_chart({"y": np.array([1.0, 2.0, np.nan, 3.0, 4.0])}, title="t")
    assert gap.count("<polyline") == 2
    assert "no finite values" in svg.line_chart({"y": np.full(3, np.nan)}, title="t")


def test_decimation_keeps_each_buckets_min_and_max_in_order():
    rng = np.random.default_rng(0)
    y = rng.normal(size=12_345)
    y[rng.integers(0, y.size, 2_000)] = np.nan
    y[100:130] = np.nan  # buckets without a finite value keep their first point
    y[5_000] = np.inf
    y[7_000:7_020] = 3.0  # ties: the first occurrence
    x = np.arange(y.size) * 0.5
    edges = np.linspace(0, y.size, svg.MAX_BUCKETS + 1).astype(int)
    keep = []
    for a, b in zip(edges[:-1], edges[1:]):
        part = y[a:b]
        finite = np.isfinite(part).any()
        keep += sorted({a + int(np.nanargmin(part)), a + int(np.nanargmax(part))}) if finite else [a]
    got_x, got_y = svg._decimate(x, y)
    np.testing.assert_array_equal(got_x, x[keep])
    np.testing.assert_array_equal(got_y, y[keep])


def test_flagged_pairs_are_circled():
    mats = np.tile(np.eye(3), (6, 1, 1))
    mats[3, 0, 2] = 7.5
    state = {"matrices": mats, "transformation": "TRANSLATION", "confidence": np.array([1, .9, .9, .2, .9, .9]),
             "outliers": np.array([False, False, False, True, False, False])}
    (fig,) = figures.STATE_FIGURES["registration_calculation"](state, None, None)
    assert fig.count('class="m"') == 2 + 1 + 1  # tx and ty, cumulative, confidence
    assert "pair 2-3: tx = 7.5 px (flagged)" in fig and "Flagged pairs (circled): 2-3." in fig
    del state["outliers"], state["confidence"]
    (fig,) = figures.STATE_FIGURES["registration_calculation"](state, None, None)
    assert 'class="m"' not in fig and "pair confidence" not in fig


CHROMIUM = Path("/usr/lib/chromium/chromium-headless-shell")


@pytest.mark.browser
def test_page_in_a_headless_browser(demo, tmp_path):
    """Load the page from file:// in Chromium: no console error, every image decodes; save a screenshot."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}: apt-get install -y --no-install-recommends chromium-headless-shell")
    toml, _ = demo
    page_path = toml.parent / REPORT_DIR / PAGE
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors, requests = [], []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: requests.append(req.url))
            page.goto(page_path.as_uri(), wait_until="load")
            sizes = page.evaluate("Array.from(document.images, i => [i.complete, i.naturalWidth, i.naturalHeight])")
            charts = page.evaluate("Array.from(document.querySelectorAll('svg.chart'), s => s.getBBox().width)")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    assert len(sizes) >= 3 * len(STEPS) and all(ok and w > 0 and h > 0 for ok, w, h in sizes)
    assert len(charts) >= 3 * len(STEPS) and min(charts) > 100
    assert (tmp_path / "report.png").stat().st_size > 10_000
