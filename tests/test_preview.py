"""Parameter preview: a step on sampled slices per value, a contact sheet, the store never touched."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import demo_project, tree_digest

from pystack3d_dask.engine import Project
from pystack3d_dask.errors import ConfigError, StoreError
from pystack3d_dask.preview import parse_setting, preview
from pystack3d_dask.report import REPORT_DIR


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    toml = demo_project(tmp_path_factory.mktemp("preview"))
    Project(toml, quiet=True).run(["registration_transformation"], plots=False)
    return Project(toml)


def test_destriping_grid_leaves_the_store_as_it_was(project, capsys):
    from pystack3d_dask.cli import main

    store = project.store_path
    before = tree_digest(store)
    assert main(["preview", str(project.config.toml_path), "--step", "destriping", "--slices", "3",
                 "--set", "filters[0].noise_level=2,20,200"]) == 0
    assert tree_digest(store) == before
    out = capsys.readouterr().out
    ratios = [float(v) for v in re.findall(r"stripe power after / before ([\d.e+-]+)", out)]
    assert len(ratios) == 3 and ratios[0] > ratios[1] > ratios[2] and ratios[2] < 1  # stronger filter, fewer stripes
    folder = store.parent / REPORT_DIR
    page = (folder / "preview_destriping.html").read_text()
    assert page.count("<img") == 3 * 4  # 3 slices, before and after for 3 values
    assert "filters[0].noise_level=200" in page and "registration_transformation" in page
    record = json.loads((folder / "preview_destriping.json").read_text())
    nz = project.result("registration_transformation").shape[0]
    assert record["slices"] == [0, round((nz - 1) / 2), nz - 1] and len(record["measures"]) == 3
    assert not (store / "destriping").exists()


def test_registration_and_background_measures(project):
    reg = preview(project, "registration_calculation", slices=[10, 11], settings=["transformation=TRANSLATION"])
    (values,) = reg.measures.values()
    assert reg.slices == [10, 11] and values["residual shift (px)"] < 0.5
    assert 0 < values["pair confidence (higher is better)"] <= 1
    bkg = preview(project, "bkg_removal", slices=2, settings=["orders=[0, 0, 0],[1, 1, 1]"])
    flat, fitted = bkg.measures.values()
    assert fitted["trend left (grey levels)"] < flat["trend left (grey levels)"]


def test_from_the_input_images_before_any_run(tmp_path):
    toml = demo_project(tmp_path)
    result = preview(Project(toml), "cropping", slices=2, settings=["area=[10, 40, 10, 40],[0, 99999, 0, 99999]"])
    assert not (toml.parent / "pystack3d_dask.zarr").exists()
    assert list(result.measures) == ['area=[10, 40, 10, 40]', 'area=[0, 99999, 0, 99999]']
    assert "the input images in" in result.page.read_text()


def test_settings_syntax():
    s = parse_setting("filters[0].noise_level=50, 100,2e2")
    assert s.path == ("filters", 0, "noise_level") and s.values == (50, 100, 200.0)
    assert parse_setting("area=[0, 10, 0, 10],[1, 9, 1, 9]").values == ([0, 10, 0, 10], [1, 9, 1, 9])
    assert parse_setting("weight_func=HuberT,\"None\"").values == ("HuberT", "None")
    for bad in ("noise_level", "=1", "a..b=1", "k=", "k=1 2"):
        with pytest.raises(ConfigError, match="--set"):
            parse_setting(bad)


@pytest.mark.parametrize("step, setting, message", [
    ("destriping", "filters[0].nosie_level=1", "did you mean 'noise_level'"),
    ("destriping", "filters[3].noise_level=1", "filters has 1 entries"),
    ("destriping", "maxiter=5", "unknown key 'maxiter' (did you mean 'maxit'?)"),
    ("destriping", "maxit=-1,5", "maxit"),
    ("bkg_removal", "weight_func=Huber", "did you mean 'HuberT'"),
    ("destriping", "maxit.x=1", "maxit is 50, not a list or table"),
])
def test_bad_settings_are_errors_before_any_work(project, step, setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        preview(project, step, settings=[setting])


def test_bad_steps_and_slices(project, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'destriping'"):
        preview(project, "destripping")
    with pytest.raises(ConfigError, match="needs every slice"):
        preview(project, "resampling")
    with pytest.raises(ConfigError, match="from 1 to 15"):
        preview(project, "registration_calculation", slices=[0])
    with pytest.raises(ConfigError, match="slices"):
        preview(project, "destriping", slices=0)
    toml = demo_project(tmp_path)
    with pytest.raises(StoreError, match="no store"):  # destriping's input is not computed yet
        preview(Project(toml), "destriping")
    with pytest.raises(ConfigError, match="at most 24"):
        preview(project, "destriping", settings=["maxit=1,2,3,4,5", "cvg_threshold=0,1e-3,1e-2,1e-1,1"])
