"""The pystack3d-dask command: run, info, export, demo; errors are one clear line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tifffile
from conftest import random_stack, write_params, write_slices

from pystack3d_dask.cli import main

PARAMS = """
process_steps = ["cropping"]
[cropping]
area = [0, 10, 0, 8]
"""


def test_run_info_export(tmp_path, capsys):
    stack = random_stack((5, 12, 14))
    write_slices(tmp_path, stack)
    write_params(tmp_path, PARAMS)
    assert main(["-q", "run", "--no-plots", str(tmp_path / "params.toml")]) == 0
    assert re.search(r"computed: input \([\d.]+ s\), cropping", capsys.readouterr().out)
    assert main(["-q", "run", str(tmp_path)]) == 0
    assert "already complete: input, cropping" in capsys.readouterr().out
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "fig")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "fig" / "index.html")
    page = (tmp_path / "fig" / "index.html").read_text()
    assert '<section id="input">' in page and '<section id="cropping">' in page
    assert main(["info", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["steps"]["cropping"]["shape"] == [5, 8, 10]
    assert main(["export", str(tmp_path), "--step", "cropping", "--format", "tiff", str(tmp_path / "out")]) == 0
    files = sorted((tmp_path / "out").glob("*.tif"))
    assert len(files) == 5
    np.testing.assert_array_equal(tifffile.imread(files[4]), stack[4, 4:12, 0:10])


def test_errors_are_one_line(tmp_path, capsys):
    write_slices(tmp_path, random_stack((3, 6, 6)))
    write_params(tmp_path, PARAMS.replace("area", "aera"))
    assert main(["run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown key 'aera' (did you mean 'area'?)" in err
    assert main(["info", str(tmp_path / "nothing")]) == 2


def test_bad_demo_shape():
    with pytest.raises(SystemExit):
        main(["demo", "--shape", "10,abc"])
