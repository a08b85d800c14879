"""Parameter files: PyStack3D files load unchanged; every mistake is an error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pystack3d_dask.config import build_params
from pystack3d_dask.errors import ConfigError
from pystack3d_dask.project_config import load_config
from pystack3d_dask.steps import STEP_NAMES, available

CONFIGS = Path(__file__).parents[1] / "configs"


def test_pystack3d_default_file_loads_unchanged(tmp_path):
    text = (CONFIGS / "pystack3d_params.toml").read_text()
    (tmp_path / "params.toml").write_text(text)
    cfg = load_config(tmp_path)  # a folder holding params.toml
    assert cfg.project_dir == tmp_path
    assert cfg.ind_max == 99999 and cfg.channels == (".",)
    assert cfg.process_steps[0] == "cropping"
    assert set(cfg.step_params) >= set(available()) & set(cfg.process_steps)
    assert load_config(tmp_path / "params.toml") == cfg  # or the file itself
    assert (tmp_path / "params.toml").read_text() == text  # never rewritten


@pytest.mark.parametrize("old", ["dirname", "input_dirname", "project_dir"])
def test_project_dir_and_its_older_names(tmp_path, old):
    cfg = load_config({old: str(tmp_path), "process_steps": ["cropping"], "cropping": {"area": [0, 5, 0, 5]}})
    assert cfg.project_dir == tmp_path


def test_relative_project_dir_is_relative_to_the_toml(tmp_path):
    (tmp_path / "p.toml").write_text('project_dir = "data"\nprocess_steps = ["cropping"]\n'
                                     "[cropping]\narea = [0, 1, 0, 1]\n")
    assert load_config(tmp_path / "p.toml").project_dir == tmp_path / "data"


BASE = {"process_steps": ["cropping"], "cropping": {"area": [0, 10, 0, 10]}}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"nprocs": 2}, r"unknown key 'nprocs' \(did you mean 'nproc'\?\)"),
        ({"croping": {"area": [0, 1, 0, 1]}}, r"unknown table \[croping\] \(did you mean 'cropping'\?\)"),
        ({"process_steps": ["cropping", "bkg_remval"]}, r"bkg_remval.*did you mean 'bkg_removal'"),
        ({"process_steps": ["cropping", "cropping"]}, r"'cropping'.*only once"),
        ({"process_steps": []}, "process_steps is required"),
        ({"process_steps": ["registration_transformation", "registration_calculation"]},
         "'registration_transformation' needs 'registration_calculation' earlier in the list"),
        ({"nproc": "2"}, r"nproc = '2' is invalid: expected an integer"),
        ({"nproc": 0}, r"nproc = 0 is invalid: expected an integer >= 1"),
        ({"ind_min": -1}, r"ind_min = -1"),
        ({"ind_min": 5, "ind_max": 2}, r"ind_max = 2 is invalid: expected >= ind_min \(5\)"),
        ({"channels": ["A", "A"]}, r"channels = \['A', 'A'\]"),
        ({"history": ["bkg_removal"]}, r"history = \['bkg_removal'\]"),
        ({"cropping": {"area": [0, 10, 0]}}, r"\[cropping\] area = \[0, 10, 0\] is invalid: expected a list of 4"),
        ({"cropping": {"area": [0, 10, 0, 10], "aera": 1}}, r"\[cropping\] unknown key 'aera'"),
        ({"cropping": {}}, r"\[cropping\] the key 'area' is required"),
        ({"cropping": {"area": [0, 1.5, 0, 10]}}, r"\[cropping\] area = 1.5 is invalid: expected an integer"),
        ({"cluster": {"type": "slurmm"}}, r"\[cluster\] type = 'slurmm'.*did you mean 'slurm'"),
        ({"cluster": {"type": "address"}}, r"\[cluster\] address = None"),
        ({"cluster": {"n_workers": 0}}, r"\[cluster\] n_workers = 0"),
        ({"dirname": "a", "project_dir": "b"}, "give the input folder once"),
    ],
)
def test_every_mistake_is_an_error_naming_it(change, match):
    with pytest.raises(ConfigError, match=match):
        load_config({**BASE, **change})


def test_error_names_the_file(tmp_path):
    (tmp_path / "params.toml").write_text('process_steps = ["cropping"]\nnprocs = 1\n')
    with pytest.raises(ConfigError, match=r"params.toml: unknown key 'nprocs'"):
        load_config(tmp_path)


def test_invalid_toml_and_missing_file(tmp_path):
    (tmp_path / "params.toml").write_text("process_steps = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_a_folder_with_several_tomls_is_ambiguous(tmp_path):
    (tmp_path / "a.toml").write_text("")
    (tmp_path / "b.toml").write_text("")
    with pytest.raises(ConfigError, match="2 .toml files"):
        load_config(tmp_path)


def test_history_is_the_prefix_done():
    cfg = load_config({**BASE, "process_steps": ["cropping", "cropping_final"], "history": ["cropping"],
                       "cropping_final": {"area": [0, 5, 0, 5]}})
    assert cfg.steps_to_run == ("cropping_final",)


def test_cluster_table():
    cfg = load_config({**BASE, "cluster": {"type": "local", "n_workers": 2, "memory_limit": "2GiB"}})
    assert cfg.cluster.type == "local" and cfg.cluster.n_workers == 2


def test_build_params_aliases_and_conflicts():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class P:
        ALIASES = {"threshold": "threshold_min"}
        threshold_min: float | None = None

    assert build_params(P, {"threshold": 3}, section="s").threshold_min == 3.0
    with pytest.raises(ConfigError, match="both 'threshold' and its newer name 'threshold_min'"):
        build_params(P, {"threshold": 3, "threshold_min": 4}, section="s")
    with pytest.raises(ConfigError, match=r"\[s\] threshold_min = True"):
        build_params(P, {"threshold_min": True}, section="s")


def test_step_names_are_pystack3ds():
    assert STEP_NAMES == ("cropping", "bkg_removal", "intensity_rescaling", "intensity_rescaling_area",
                          "registration_calculation", "registration_transformation", "destriping",
                          "resampling", "cropping_final")
