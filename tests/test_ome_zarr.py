"""OME-Zarr export: levels against numpy, real readers (ome-zarr-models, ome-zarr, napari), resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import dask.array as da
import numpy as np
import pytest
import zarr
from conftest import random_stack, tree_digest, vendor_tags, write_params

from pystack3d_dask import Project
from pystack3d_dask.cli import main
from pystack3d_dask.errors import ConfigError, StoreError
from pystack3d_dask.io import ome_zarr
from pystack3d_dask.io.ome_zarr import ISOTROPY, plan_levels, write_ome_zarr
from pystack3d_dask.kernels.downsample import mean_downsample


def _reference_mean(x: np.ndarray, factors) -> np.ndarray:
    """Block mean in float64 from the strided sub-arrays, integers rounded half up (the kernel's rule)."""
    out_shape = tuple(n // f for n, f in zip(x.shape, factors))
    total = np.zeros(out_shape, np.float64)
    for offset in np.ndindex(*factors):
        total += x[tuple(slice(o, o + n * f, f) for o, n, f in zip(offset, out_shape, factors))]
    mean = total / np.prod(factors)
    return np.floor(mean + 0.5).astype(x.dtype) if x.dtype.kind in "ui" else mean.astype(x.dtype)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_mean_downsample_against_a_loop(dtype):
    x = random_stack((5, 9, 7), "uint16" if dtype == "int16" else dtype)
    x = (x.astype(np.int32) - 32768).astype(dtype) if dtype == "int16" else x
    got = mean_downsample(x, factors=(2, 2, 3))
    assert got.shape == (2, 4, 2) and got.dtype == x.dtype
    expected = np.empty((2, 4, 2))
    for idx in np.ndindex(expected.shape):  # the plain loop over boxes
        expected[idx] = x[2 * idx[0]: 2 * idx[0] + 2, 2 * idx[1]: 2 * idx[1] + 2, 3 * idx[2]: 3 * idx[2] + 3].mean()
    if x.dtype.kind in "ui":
        expected = np.floor(expected + 0.5)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(got, _reference_mean(x, (2, 2, 3)), rtol=0 if x.dtype.kind in "ui" else 1e-6)
    with pytest.raises(ValueError, match=r"factors = \(2, 2\) is invalid: expected 3 integers >= 1"):
        mean_downsample(x, factors=(2, 2))


def test_z_is_halved_only_while_the_voxel_stays_isotropic():
    for scale in [(0.002, 0.008, 0.008), (0.01, 0.005, 0.005), (0.05, 0.005, 0.005)]:
        levels = plan_levels((1, 400, 4096, 4096), 1, scale=scale)
        assert max(levels[-1].shape[2:]) <= ome_zarr.COARSEST_PX < max(levels[-2].shape[2:])
        for prev, lv in zip(levels, levels[1:]):
            assert lv.factors[1:] == (2, 2)
            halvable = 2 * prev.scale[0] <= ISOTROPY * lv.scale[1]
            assert lv.factors[0] == (2 if halvable else 1)
            assert lv.scale[0] == pytest.approx(prev.scale[0] * lv.factors[0])
    fine_z = plan_levels((1, 400, 4096, 4096), 1, scale=(0.002, 0.008, 0.008))
    assert fine_z[1].factors == (2, 2, 2)  # a finer z is halved at once...
    coarse_z = plan_levels((1, 400, 4096, 4096), 1, scale=(0.05, 0.005, 0.005))
    assert [lv.factors[0] for lv in coarse_z[1:4]] == [1, 1, 1]  # ...a coarser one waits for x


def _omero(image):
    """The image's omero block, validated (ome-zarr-models keeps it as an unchecked extra)."""
    from ome_zarr_models.common.omero import Omero

    return Omero.model_validate(image.ome_attributes.omero)


def _levels(path) -> list[np.ndarray]:
    root = zarr.open_group(path, mode="r")
    return [root[str(i)][:] for i in range(len(list(root.array_keys())))]


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_levels_equal_numpy_for_every_chunking(tmp_path, version):
    x = np.stack([random_stack((13, 600, 530), seed=1), random_stack((13, 600, 530), seed=2)])
    results = []
    for cz in (1, 3, 13):
        out = tmp_path / f"{cz}.ome.zarr"
        write_ome_zarr(da.from_array(x, chunks=(1, cz, -1, -1)), out, scale=(0.002, 0.005, 0.005),
                       channel_names=["ESB", "SE2"], version=version, slab_mib=0.6)
        levels = _levels(out)
        results.append(levels)
        np.testing.assert_array_equal(levels[0], x)
        expected = x
        for lv, level in zip(plan_levels(x.shape, 1, scale=(0.002, 0.005, 0.005))[1:], levels[1:]):
            expected = _reference_mean(expected, (1,) + lv.factors)
            np.testing.assert_array_equal(level, expected)
        assert len(levels) == 3  # 600 -> 300 -> 150 px
    for other in results[1:]:  # the same bytes whatever the source chunking and write units
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_valid_for_ome_zarr_models_and_read_by_ome_zarr(tmp_path, version):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models import open_ome_zarr

    x = random_stack((9, 520, 300), "uint16")
    out = tmp_path / "img.ome.zarr"
    write_ome_zarr(x, out, scale=(0.004, 0.004, 0.005), z_origin=1.5, channel_names=["InLens"], version=version)
    image = open_ome_zarr(out, version=version)  # validates the metadata against the spec and the arrays
    multiscale = image.ome_attributes.multiscales[0]
    assert [ax.name for ax in multiscale.axes] == ["c", "z", "y", "x"]
    assert multiscale.axes[1].unit == "micrometer"
    scales = [d.coordinateTransformations[0].scale for d in multiscale.datasets]
    assert scales[:2] == [[1, 0.004, 0.004, 0.005], [1, 0.008, 0.008, 0.01]]
    assert multiscale.datasets[1].coordinateTransformations[1].translation == pytest.approx([0, 1.502, 0.002, 0.0025])
    assert _omero(image).channels[0].label == "InLens"
    if version == "0.5":
        assert zarr.open_group(out).metadata.zarr_format == 3 and zarr.open_array(out / "0").shards is not None
    else:
        meta = json.loads((out / "0" / ".zarray").read_text())
        assert meta["compressor"]["cname"] == "lz4" and meta["dimension_separator"] == "/"

    (node,) = [n for n in Reader(parse_url(str(out)))() if n.data]
    np.testing.assert_array_equal(np.asarray(node.data[0]), x[None])
    np.testing.assert_array_equal(np.asarray(node.data[1]), mean_downsample(x[None], factors=(1, 2, 2, 2)))
    assert node.metadata["channel_names"] == ["InLens"]
    assert node.metadata["coordinateTransformations"][0][0]["scale"] == [1, 0.004, 0.004, 0.005]


def test_resume_after_an_interruption_writes_only_what_is_missing(tmp_path, monkeypatch):
    x = da.from_array(random_stack((20, 600, 400)), chunks=(2, -1, -1))
    out = tmp_path / "img.ome.zarr"
    write_ome_zarr(x, tmp_path / "ref.ome.zarr", scale=(0.01, 0.005, 0.005))
    written = []
    real = ome_zarr._write_unit

    def dies_after_three(block, path, name, channel, start):
        if len(written) == 3:
            raise KeyboardInterrupt  # a kill between two units
        written.append((name, start))
        return real(block, path, name, channel, start)

    monkeypatch.setattr(ome_zarr, "_write_unit", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        write_ome_zarr(x, out, scale=(0.01, 0.005, 0.005), slab_mib=0.5)
    assert "ome" not in zarr.open_group(out).attrs  # no reader takes a partial export for an image
    written.clear()
    monkeypatch.setattr(ome_zarr, "_write_unit", lambda *a: (written.append(a[2:]), real(*a))[1])
    write_ome_zarr(x, out, scale=(0.01, 0.005, 0.005), slab_mib=0.5)
    level0_units = 20 // plan_levels((1, 20, 600, 400), 1, scale=(0.01, 0.005, 0.005), slab_mib=0.5)[0].slab
    assert sum(1 for name, *_ in written if name == "0") == level0_units - 3
    for a, b in zip(_levels(out), _levels(tmp_path / "ref.ome.zarr")):
        np.testing.assert_array_equal(a, b)
    written.clear()
    write_ome_zarr(x, out, scale=(0.01, 0.005, 0.005), slab_mib=0.5)  # complete: nothing to do
    assert written == []


# The child exports with every write unit slowed down, so that the parent can kill it mid-level.
CHILD = textwrap.dedent("""
    import sys, time
    import zarr
    from pystack3d_dask.io import ome_zarr

    real = ome_zarr._write_unit
    ome_zarr._write_unit = lambda *args: (time.sleep(0.05), real(*args))[1]
    ome_zarr.write_ome_zarr(zarr.open_array(sys.argv[1], mode="r"), sys.argv[2], scale=(0.01, 0.005, 0.005),
                            version=sys.argv[3], slab_mib=0.001)
""")


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_sigkill_then_resume_is_byte_identical(tmp_path, version):
    source = zarr.create_array(tmp_path / "src.zarr", shape=(40, 300, 280), chunks=(1, 300, 280), dtype="u1")
    source[:] = random_stack((40, 300, 280))
    out, script = tmp_path / "killed.ome.zarr", tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "src.zarr"), str(out), version], env=env)
    deadline = time.monotonic() + 120
    while len([p for p in (out / "0").rglob("*") if p.is_file() and "zarr" not in p.name]) < 10:
        assert proc.poll() is None and time.monotonic() < deadline, "the export ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "ome" not in zarr.open_group(out, mode="r").attrs
    write_ome_zarr(source, out, scale=(0.01, 0.005, 0.005), version=version, slab_mib=0.001)
    write_ome_zarr(source, tmp_path / "clean.ome.zarr", scale=(0.01, 0.005, 0.005), version=version, slab_mib=0.001)

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    killed, clean = files(out), files(tmp_path / "clean.ome.zarr")
    assert killed.keys() == clean.keys()  # no partial file left behind
    assert all(killed[k] == clean[k] for k in clean)


def test_same_result_on_a_local_cluster(tmp_path, local_cluster):
    from distributed import Client

    x = da.from_array(random_stack((12, 600, 300)), chunks=(5, -1, -1))
    write_ome_zarr(x, tmp_path / "threads.ome.zarr", slab_mib=0.5)
    with Client(local_cluster):
        write_ome_zarr(x, tmp_path / "cluster.ome.zarr", slab_mib=0.5)
    for a, b in zip(_levels(tmp_path / "threads.ome.zarr"), _levels(tmp_path / "cluster.ome.zarr")):
        np.testing.assert_array_equal(a, b)


def test_refuses_foreign_or_other_outputs(tmp_path):
    x = random_stack((4, 40, 40))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="is not empty and holds no pystack3d-dask export"):
        write_ome_zarr(x, foreign)
    assert tree_digest(foreign) == {"notes.txt": tree_digest(foreign)["notes.txt"]}
    (tmp_path / "file.ome.zarr").write_text("")
    with pytest.raises(StoreError, match="is a file"):
        write_ome_zarr(x, tmp_path / "file.ome.zarr")
    write_ome_zarr(x, tmp_path / "a.ome.zarr", source_id="a")
    before = tree_digest(tmp_path / "a.ome.zarr")
    with pytest.raises(StoreError, match=r"holds another export \(a, OME-Zarr 0.5\)"):
        write_ome_zarr(x, tmp_path / "a.ome.zarr", source_id="b")
    with pytest.raises(StoreError, match="holds no pystack3d-dask export"):
        write_ome_zarr(x, tmp_path / "a.ome.zarr", source_id="a", version="0.4")
    assert tree_digest(tmp_path / "a.ome.zarr") == before
    with pytest.raises(ConfigError, match=r"scale = \(1.0, 0.0, 1.0\) is invalid"):
        write_ome_zarr(x, tmp_path / "b", scale=(1, 0, 1))
    with pytest.raises(ConfigError, match=r"expected 1 names"):
        write_ome_zarr(x, tmp_path / "b", channel_names=["a", "b"])
    with pytest.raises(ConfigError, match=r"image of shape \(40, 40\) is invalid: expected a non-empty \(z, y, x\)"):
        write_ome_zarr(x[0], tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.fixture
def zeiss_project(tmp_path):
    """Two channels of Zeiss slices (5 nm pixels) named with their z (20 nm apart)."""
    for i, ch in enumerate(["ESB", "SE2"]):
        (tmp_path / ch).mkdir()
        for k, img in enumerate(random_stack((8, 300, 280), seed=i)):
            import tifffile

            tifffile.imwrite(tmp_path / ch / f"slice_{k}_z={1 + k * 0.02:.4f}um.tif", img,
                             extratags=vendor_tags("zeiss", detector=f"{ch} detector"))
    write_params(tmp_path, 'channels = ["ESB", "SE2"]\nprocess_steps = ["cropping"]\n'
                           "[cropping]\narea = [10, 250, 0, 290]\n")
    return tmp_path


def test_project_export_every_channel_with_the_instrument_scale(zeiss_project, capsys):
    from ome_zarr_models import open_ome_zarr

    project = Project(zeiss_project, quiet=True)
    project.run()
    assert main(["-q", "export", str(zeiss_project), "--step", "cropping", "--format", "ome-zarr",
                 str(zeiss_project / "out.ome.zarr")]) == 0
    image = open_ome_zarr(zeiss_project / "out.ome.zarr", version="0.5")
    ds0 = image.ome_attributes.multiscales[0].datasets[0].coordinateTransformations
    assert ds0[0].scale == pytest.approx([1, 0.02, 0.005, 0.005])
    assert ds0[1].translation == pytest.approx([0, 1.0, 0, 0])
    assert [c.label for c in _omero(image).channels] == ["ESB", "SE2"]
    level0 = zarr.open_array(zeiss_project / "out.ome.zarr" / "0")
    for i, ch in enumerate(["ESB", "SE2"]):
        np.testing.assert_array_equal(level0[i], project.result("cropping", ch).compute())
    project.export("cropping", zeiss_project / "se2.ome.zarr", channel="SE2", format="ome-zarr-0.4")
    image = open_ome_zarr(zeiss_project / "se2.ome.zarr", version="0.4")
    assert [c.label for c in _omero(image).channels] == ["SE2"]


def test_project_export_errors(zeiss_project, capsys):
    project = Project(zeiss_project, quiet=True)
    project.run(steps=[])
    with pytest.raises(ConfigError, match="format = 'zarr' is invalid: expected one of ome-zarr"):
        project.export("input", zeiss_project / "x", format="zarr")
    with pytest.raises(StoreError, match="step 'cropping' has no complete result"):
        project.export("cropping", zeiss_project / "x", format="ome-zarr")
    assert not (zeiss_project / "x").exists()
    assert main(["export", str(zeiss_project), "--step", "input", "--format", "n5", str(zeiss_project / "x")]) == 2
    assert "format = 'n5' is invalid" in capsys.readouterr().err


@pytest.mark.slow
def test_napari_reader_hook_headless(tmp_path):
    reader = pytest.importorskip("napari_ome_zarr._reader")
    x = random_stack((6, 600, 520), "uint16")
    write_ome_zarr(x, tmp_path / "img.ome.zarr", scale=(0.01, 0.005, 0.005), channel_names=["InLens"])
    (layer,) = reader.napari_get_reader(str(tmp_path / "img.ome.zarr"))(str(tmp_path / "img.ome.zarr"))
    data, kwargs, kind = layer
    assert kind == "image"
    np.testing.assert_array_equal(np.asarray(data[0]).squeeze(), x)
    assert list(kwargs["scale"])[-3:] == pytest.approx([0.01, 0.005, 0.005])
