"""TIFF discovery and reading, crop areas, dtype casting: exact expectations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile
from conftest import random_stack, write_slices

from pystack3d_dask.errors import ConfigError, InputError
from pystack3d_dask.io.tiff import discover, natural_key, read_slices
from pystack3d_dask.kernels.crop import area_slices, crop
from pystack3d_dask.kernels.dtype import clip_cast, slice_stats
from pystack3d_dask.steps.cropping import crop as crop_stack


def test_natural_sort():
    names = ["s_10.tif", "s_2.tif", "s_1.tif", "S_3.tif"]
    assert sorted(names, key=natural_key) == ["s_1.tif", "s_2.tif", "S_3.tif", "s_10.tif"]


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_discover_and_read_in_natural_order(tmp_path, dtype):
    stack = random_stack((12, 9, 7), dtype)
    write_slices(tmp_path, stack)
    (src,) = discover(tmp_path)
    assert src.nslices == 12 and src.shape == (9, 7) and src.dtype == np.dtype(dtype)
    assert src.names[2] == "slice_2_z=0.0200um.tif"  # not slice_10
    np.testing.assert_array_equal(read_slices(src, 0, 12), stack)
    (sub,) = discover(tmp_path, ind_min=3, ind_max=5)
    np.testing.assert_array_equal(read_slices(sub, 0, sub.nslices), stack[3:6])
    (end,) = discover(tmp_path, ind_min=10, ind_max=99999)
    assert end.nslices == 2


def test_multipage_tiff(tmp_path):
    stack = random_stack((6, 8, 5), "uint16")
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    (src,) = discover(tmp_path, ind_min=1, ind_max=4)
    assert src.pages == (1, 2, 3, 4)
    np.testing.assert_array_equal(read_slices(src, 1, 3), stack[2:4])


def test_channels_must_agree(tmp_path):
    write_slices(tmp_path / "A", random_stack((4, 6, 6)))
    write_slices(tmp_path / "B", random_stack((3, 6, 6)))
    with pytest.raises(InputError, match="channel 'B' has 3 slices"):
        discover(tmp_path, ["A", "B"])
    with pytest.raises(InputError, match=r"channel folder .*C \(channel 'C'\) does not exist"):
        discover(tmp_path, ["A", "C"])


def test_bad_folders_and_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no .tif"):
        discover(tmp_path / "empty")
    write_slices(tmp_path / "s", random_stack((5, 6, 6)))
    tifffile.imwrite(tmp_path / "s" / "slice_3_z=0.0300um.tif", np.zeros((6, 7), np.uint8))
    with pytest.raises(InputError, match=r"slice_3_z=0.0300um.tif is 7 x 6 px uint8, but slice_0"):
        discover(tmp_path / "s")
    tifffile.imwrite(tmp_path / "s" / "slice_3_z=0.0300um.tif", np.zeros((6, 6), np.uint16))
    with pytest.raises(InputError, match=r"slice_3_z=0.0300um.tif is 6 x 6 px uint16"):
        discover(tmp_path / "s")
    (tmp_path / "s" / "slice_3_z=0.0300um.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(InputError, match=r"cannot read TIFF .*slice_3_z=0.0300um.tif"):
        discover(tmp_path / "s")
    tifffile.imwrite(tmp_path / "s" / "slice_3_z=0.0300um.tif", np.zeros((6, 6), np.int32))
    with pytest.raises(InputError, match=r"dtype int32; supported: uint8, uint16, float32"):
        discover(tmp_path / "s")


def test_truncated_pixels_are_named_at_read(tmp_path):
    paths = write_slices(tmp_path, random_stack((3, 64, 64)))
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:-3000])  # header intact, pixel data cut
    (src,) = discover(tmp_path)
    with pytest.raises(InputError, match="slice_1_z=0.0100um.tif"):
        read_slices(src, 0, 3)


def test_area_bottom_left_origin():
    img = np.arange(10 * 20).reshape(10, 20)
    rows, cols = area_slices((5, 15, 0, 4), img.shape)
    assert (rows, cols) == (slice(6, 10), slice(5, 15))  # rows H - ymax : H - ymin
    np.testing.assert_array_equal(crop(img, (5, 15, 0, 4)), img[6:10, 5:15])


def test_area_clipping_and_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert area_slices((0, 99999, 0, 99999), (10, 20)) == (slice(0, 10), slice(0, 20))
    with pytest.warns(UserWarning, match=r"reaches past the 20 x 10 px image; clipped to \[5, 20, 0, 10\]"):
        area_slices((5, 25, 0, 12), (10, 20))
    with pytest.raises(ConfigError, match=r"\[25, 30, 0, 5\] leaves no pixel in an image of 20 x 10 px"):
        area_slices((25, 30, 0, 5), (10, 20), key="[cropping] area")
    with pytest.raises(ConfigError, match="xmin < xmax"):
        area_slices((5, 5, 0, 5), (10, 20))


def test_crop_on_numpy_dask_zarr():
    import dask.array as da
    import zarr

    stack = random_stack((5, 10, 12))
    z = zarr.create_array(store={}, shape=stack.shape, dtype=stack.dtype, chunks=(2, 10, 12))
    z[:] = stack
    for arr in (stack, da.from_array(stack, chunks=(3, 10, 12)), z):
        out = crop_stack(arr, (2, 8, 1, 9))
        assert isinstance(out, da.Array)
        np.testing.assert_array_equal(out.compute(), stack[:, 1:9, 2:8])


def test_clip_cast_rounds_and_clips():
    raw = np.array([[[-3.0, 0.4, 0.5, 1.5, 254.6, 300.0, np.nan]]])
    np.testing.assert_array_equal(clip_cast(raw, np.uint8), [[[0, 0, 0, 2, 255, 255, 0]]])
    out = clip_cast(np.array([[[1e40, -1.0]]]), np.float32)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    stats = slice_stats(np.array([[[1.0, np.nan], [3.0, 5.0]], [[np.nan, np.nan], [np.nan, np.nan]]]))
    np.testing.assert_allclose(stats[0], [1, 5, 3])
    assert np.isnan(stats[1]).all()
