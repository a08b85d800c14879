"""z positions parsed from file names (PyStack3D's ``policy``)."""

import numpy as np
import pytest

from pystack3d_dask.errors import ConfigError, InputError
from pystack3d_dask.io.zpos import check_zpos, compile_policy, parse_zpos
from pystack3d_dask.synthetic import POLICY, make_case


def test_default_policy_reads_signed_and_exponent_values_from_paths():
    names = ["/data/ESB/slice_00001_z=-3e-2um.tif", "slice_00002_z=0um.tif",
             "slice_00003_z=1.0894um.tif", "slice_00004_z=+2.5E1um.tif", "slice_00005_z=.5e2um.tif"]
    np.testing.assert_array_equal(parse_zpos(names), [-0.03, 0.0, 1.0894, 25.0, 50.0])


def test_synthetic_case_names_give_its_positions():
    case = make_case((24, 16, 16), defects=("dz",))
    names = [case.spec.file_name(j) for j in range(len(case.kept))]
    np.testing.assert_allclose(parse_zpos(names, POLICY), case.zpos, atol=1e-12)


def test_literal_text_is_matched_literally():
    # '.', '(', '+' are regex metacharacters: they must match themselves only
    policy = "img(a)+{z_coord}.tif"
    assert parse_zpos(["img(a)+1.5.tif"], policy).tolist() == [1.5]
    with pytest.raises(InputError, match="img.a.X1.5.tif"):
        parse_zpos(["img(a)+1.5.tif", "img(a)X1.5.tif"], policy)
    with pytest.raises(InputError):
        parse_zpos(["img(a)+2.0Xtif"], policy)


def test_literal_braces_and_repeated_placeholder():
    assert parse_zpos(["{s}_1_z=2.tif"], "{{s}}_{slice_nb}_z={z_coord}.tif").tolist() == [2.0]
    assert parse_zpos(["3_3.tif"], "{z_coord}_{z_coord}.tif").tolist() == [3.0]
    with pytest.raises(InputError):
        parse_zpos(["3_4.tif"], "{z_coord}_{z_coord}.tif")


def test_name_not_matching_policy_names_first_bad_file_and_policy():
    names = ["slice_00001_z=1um.tif", "slice_00002_z=1.1nm.tif", "slice_00003.tif"]
    with pytest.raises(InputError, match=r"slice_00002_z=1\.1nm\.tif.*slice_\{slice_nb\}_z=\{z_coord\}um\.tif"):
        parse_zpos(names)


@pytest.mark.parametrize("zs", [(0.1, 0.3, 0.2), (0.1, 0.2, 0.2)])
def test_non_increasing_positions_name_both_files(zs):
    names = [f"slice_{k}_z={z}um.tif" for k, z in enumerate(zs)]
    with pytest.raises(InputError, match=rf"'{names[1]}'.*'{names[2]}'"):
        parse_zpos(names)


@pytest.mark.parametrize("policy, why", [
    ("slice_{slice_nb}.tif", "z_coord"),
    ("slice_{nb}_z={z_coord}.tif", "unknown placeholder"),
    ("slice_{z_coord.tif", "brace"),
])
def test_bad_policy_is_a_config_error(policy, why):
    with pytest.raises(ConfigError, match=why):
        compile_policy(policy)


def test_check_zpos_names_slices_by_index_without_names():
    with pytest.raises(InputError, match="slice 12 .*slice 13"):
        check_zpos([0.0, 1.0, 0.5], first_index=11)
    with pytest.raises(InputError, match="slice 1 "):
        check_zpos([0.0, np.nan])
    with pytest.raises(InputError, match="3 z positions for 2 files"):
        check_zpos([0.0, 1.0, 2.0], ["a", "b"])
