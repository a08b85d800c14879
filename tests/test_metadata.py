"""Instrument metadata (Zeiss, Fibics, FEI tags written here with tifffile): reading, the stack, the project."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import random_stack, tree_digest, vendor_tags, write_params

from pystack3d_dask import Project
from pystack3d_dask.errors import ConfigError, InputError
from pystack3d_dask.io.metadata import MetadataConfig, SliceMetadata, read_metadata, stack_metadata, voxel_size_um
from pystack3d_dask.io.tiff import discover


def _stack(channels: dict) -> dict | None:
    """stack_metadata of {channel: files}, each file read on its own."""
    return stack_metadata({ch: [(p, read_metadata(p)) for p in paths] for ch, paths in channels.items()})


def _write(folder, vendor, n=5, *, names="slice_{k}_z={z:.4f}um.tif", **tags):
    """``n`` slices of ``vendor``; a tag value that is a list gives one value per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, img in enumerate(random_stack((n, 20, 18), seed=0)):
        per_slice = {key: v[k] if isinstance(v, list) else v for key, v in tags.items()}
        path = folder / names.format(k=k, z=k * 0.01)
        tifffile.imwrite(path, img, extratags=vendor_tags(vendor, **per_slice))
        paths.append(path)
    return paths


@pytest.mark.parametrize("vendor", ["zeiss", "fibics", "fei"])
def test_read_each_vendor(tmp_path, vendor):
    (path,) = _write(tmp_path, vendor, 1, pixel_nm=4.2, wd_mm=5.1, detector="ESB", z_um=12.5)
    meta = read_metadata(path)
    assert meta.vendor == vendor and meta.detector == "ESB"
    assert meta.pixel_size_nm == pytest.approx((4.2, 4.2))
    assert meta.working_distance_mm == (None if vendor == "fibics" else pytest.approx(5.1))
    assert meta.z_um == (12.5 if vendor == "fibics" else None)  # Zeiss's stage z is not the slice


def test_plain_tiff_has_no_metadata_and_bad_tags_are_named(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((4, 4), np.uint8))
    assert read_metadata(tmp_path / "plain.tif") == SliceMetadata()
    assert _stack({".": [tmp_path / "plain.tif"]}) is None
    tifffile.imwrite(tmp_path / "bad.tif", np.zeros((4, 4), np.uint8), extratags=[(51023, "s", 0, "<Fibics><Scan>", True)])
    with pytest.raises(InputError, match=r"bad.tif: the Fibics XML \(tag 51023\) is not valid XML"):
        read_metadata(tmp_path / "bad.tif")
    records = {}
    with pytest.warns(UserWarning, match="bad.tif: the Fibics XML .* this file's instrument metadata is ignored"):
        discover(tmp_path, metadata=records)  # the images stay usable
    assert records["."][0] == (tmp_path / "bad.tif", SliceMetadata())
    text = "AP_IMAGE_PIXEL_SIZE\r\nImage Pixel Size = 5.0 furlong\r\n"
    tifffile.imwrite(tmp_path / "unit.tif", np.zeros((4, 4), np.uint8), extratags=[(34118, "s", 0, text, True)])
    with pytest.raises(InputError, match=r"unit.tif: Zeiss ap_image_pixel_size = 5.0 'furlong' is not a length"):
        read_metadata(tmp_path / "unit.tif")


def test_stack_values_per_slice_only_where_they_vary(tmp_path):
    paths = _write(tmp_path / "A", "fibics", 4, z_um=[1.0, 1.02, 1.04, 1.06], detector="ESB")
    meta = _stack({"A": paths})
    assert meta["pixel_size_nm"] == [5.0, 5.0] and meta["detector"] == {"A": "ESB"}
    assert meta["z_um"] == [1.0, 1.02, 1.04, 1.06] and meta["working_distance_mm"] is None
    paths = _write(tmp_path / "B", "zeiss", 4, wd_mm=[5.0, 5.0, 5.1, 5.1])
    assert _stack({"B": paths})["working_distance_mm"] == [5.0, 5.0, 5.1, 5.1]
    paths = _write(tmp_path / "C", "zeiss", 4, wd_mm=5.0)
    assert _stack({"C": paths})["working_distance_mm"] == 5.0


def test_slices_that_disagree_on_the_pixel_size(tmp_path):
    paths = _write(tmp_path, "zeiss", 4, pixel_nm=[5.0, 5.0, 5.0, 6.0], detector=["InLens"] * 3 + ["SE2"])
    records = {}
    discover(tmp_path, metadata=records)  # read in discovery's header pass
    with pytest.raises(InputError, match=r"slice_3_z=0.0300um.tif has a pixel size of 6 x 6 nm, but "
                                         r".*slice_0_z=0.0000um.tif has 5 x 5 nm"):
        stack_metadata(records)
    with pytest.warns(UserWarning) as record:
        meta = stack_metadata(records, pixel_size_override=True)
    messages = [str(w.message) for w in record]
    assert any("pixel_size_nm is used" in m for m in messages)
    assert any("several detectors: InLens from " in m and "slice_0_z=0.0000um.tif, SE2 from " in m
               and m.endswith("slice_3_z=0.0300um.tif.") for m in messages)
    assert meta["detector"] == {".": "InLens, SE2"}


def test_voxel_size_sources():
    meta = {"pixel_size_nm": [5.0, 4.0]}
    zpos = np.array([2.0, 2.01, 2.02])
    assert voxel_size_um(meta, MetadataConfig(), zpos) == (pytest.approx((0.01, 0.004, 0.005)), 2.0)
    assert voxel_size_um(meta, MetadataConfig(pixel_size_nm=3.0), zpos)[0] == pytest.approx((0.01, 0.003, 0.003))
    assert voxel_size_um(meta, MetadataConfig(slice_thickness_nm=8.0), None) == (pytest.approx((0.008, 0.004, 0.005)), 0.0)
    with pytest.warns(UserWarning, match="z spacing is unknown"):
        assert voxel_size_um(meta, MetadataConfig(), None)[0] == pytest.approx((0.005, 0.004, 0.005))
    with pytest.warns(UserWarning, match="z spacing varies from 0.01 to 0.03 um"):
        voxel_size_um(meta, MetadataConfig(), np.array([0, 0.01, 0.02, 0.05]))
    with pytest.warns(UserWarning, match="pixel size is unknown"):
        assert voxel_size_um(None, MetadataConfig(), zpos) == (None, 0.0)


def test_metadata_table_is_strict(tmp_path):
    _write(tmp_path, "zeiss", 3)
    write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [0, 99999, 0, 99999]\n[metadata]\npixel_size = 5\n')
    with pytest.raises(ConfigError, match=r"\[metadata\] unknown key 'pixel_size' \(did you mean 'pixel_size_nm'\?\)"):
        Project(tmp_path)
    write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [0, 99999, 0, 99999]\n[metadata]\npixel_size_nm = [5, -1]\n')
    with pytest.raises(ConfigError, match=r"\[metadata\] pixel_size_nm = \(5.0, -1.0\) is invalid"):
        Project(tmp_path)
    write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [0, 99999, 0, 99999]\n[metadata]\nzpos = "names"\n')
    with pytest.raises(ConfigError, match=r"\[metadata\] zpos = 'names' is invalid: expected one of 'file_names'"):
        Project(tmp_path)


def test_project_stores_and_shows_the_metadata(tmp_path):
    for ch, det in (("ESB", "ESB detector"), ("SE2", "SE2 detector")):
        _write(tmp_path / ch, "fei", 6, pixel_nm=3.5, detector=det, wd_mm=[4.0 + 0.01 * k for k in range(6)])
    write_params(tmp_path, 'channels = ["ESB", "SE2"]\nprocess_steps = ["cropping"]\n[cropping]\narea = [0, 99999, 0, 99999]\n')
    project = Project(tmp_path, quiet=True)
    project.run(steps=[])
    shown = project.info()["metadata"]
    assert shown["vendor"] == ["fei"] and shown["pixel_size_nm"] == pytest.approx([3.5, 3.5])
    assert shown["detector"] == {"ESB": "ESB detector", "SE2": "SE2 detector"}
    assert shown["working_distance_mm"] == "4 .. 4.05 over 6 slices"


def test_disagreeing_pixel_sizes_stop_ingest_and_leave_no_store(tmp_path):
    _write(tmp_path, "zeiss", 4, pixel_nm=[5.0, 5.0, 7.0, 5.0])
    write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [0, 99999, 0, 99999]\n')
    before = tree_digest(tmp_path)
    with pytest.raises(InputError, match="slice_2_z=0.0200um.tif has a pixel size of 7 x 7 nm"):
        Project(tmp_path, quiet=True).run()
    after = tree_digest(tmp_path)
    after.pop(".pystack3d_dask.lock", None)
    assert after == before and not (tmp_path / "pystack3d_dask.zarr").exists()
    write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [0, 99999, 0, 99999]\n[metadata]\npixel_size_nm = 5\n')
    with pytest.warns(UserWarning, match="pixel_size_nm is used"):
        Project(tmp_path, quiet=True).run(steps=[])


def test_z_positions_from_the_instrument_feed_resampling(tmp_path):
    z = [0.0, 0.02, 0.03, 0.05, 0.06]  # uneven, and the names carry no z at all
    _write(tmp_path, "fibics", 5, names="img_{k:03d}.tif", z_um=z)
    write_params(tmp_path, 'process_steps = ["resampling"]\n[resampling]\ndz = 0.01\n[metadata]\nzpos = "metadata"\n')
    project = Project(tmp_path, quiet=True)
    project.run()
    np.testing.assert_allclose(project.zpos("input"), z)
    np.testing.assert_allclose(project.zpos("resampling"), np.arange(7) * 0.01)
    assert project.info()["metadata"]["zpos"] == "metadata"
    # back to the default: the names give no z, and resampling says so
    write_params(tmp_path, 'process_steps = ["resampling"]\n[resampling]\ndz = 0.01\n')
    with pytest.raises(InputError, match="does not match the z-position policy"):
        Project(tmp_path, quiet=True).run()


def test_missing_instrument_z_is_named(tmp_path):
    _write(tmp_path, "zeiss", 3)
    write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [0, 99999, 0, 99999]\n[metadata]\nzpos = "metadata"\n')
    with pytest.raises(InputError, match=r"zpos = 'metadata' but slice_0_z=0.0000um.tif has no slice position"):
        Project(tmp_path, quiet=True).run()
    assert not (tmp_path / "pystack3d_dask.zarr").exists()


def test_a_new_z_source_is_an_input_change(tmp_path):
    _write(tmp_path, "fibics", 4, z_um=[5.0, 5.1, 5.2, 5.3])  # the names say 0, 0.01, ...
    toml = 'process_steps = ["resampling"]\n[resampling]\ndz = 0.015\n'
    write_params(tmp_path, toml + '[metadata]\nzpos = "metadata"\n')
    Project(tmp_path, quiet=True).run()
    write_params(tmp_path, toml)
    with pytest.raises(InputError, match=r"the input changed .*the z positions of the slices.* --force input"):
        Project(tmp_path, quiet=True).run()
    project = Project(tmp_path, quiet=True)
    project.run(force=["input"])
    np.testing.assert_allclose(project.zpos("input"), [0, 0.01, 0.02, 0.03])
    np.testing.assert_allclose(project.zpos("resampling"), [0, 0.015, 0.03])
