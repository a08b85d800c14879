"""End to end: the demo's chain on the synthetic case gets close to the ground truth."""

from __future__ import annotations

import pytest

from pystack3d_dask.demo import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"), shape=(60, 64, 64), quiet=True)


def test_every_step_ran_and_the_chain_gets_close_to_the_truth(demo):
    assert list(demo) == ["input", "cropping", "intensity_rescaling_area", "bkg_removal",
                          "registration_calculation", "registration_transformation", "destriping",
                          "resampling", "cropping_final"]
    first, last = demo["input"], demo["cropping_final"]
    assert last.rmse < 0.75 * first.rmse
    assert last.trend_rms < 0.75 * first.trend_rms


def test_each_step_removes_its_defect(demo):
    assert demo["bkg_removal"].trend_rms < 0.7 * demo["intensity_rescaling_area"].trend_rms
    assert demo["intensity_rescaling_area"].mean_err < 0.85 * demo["cropping"].mean_err
    assert demo["input"].max_shift_px > 1.5 and demo["registration_transformation"].max_shift_px <= 0.25
    assert demo["destriping"].stripe_ratio < 0.5 * demo["registration_transformation"].stripe_ratio
    # every other slice was deleted from slice 20 on: resampling restores the truth's uniform z
    assert demo["registration_transformation"].nslices == 40 and demo["resampling"].nslices == 59
