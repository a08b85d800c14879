"""Integrity: a damaged store is found and repaired, a failed run keeps the last good result,
errors come before work, in one line, and leave every file as it was."""

from __future__ import annotations

import errno
import os
import re
import shutil

import numpy as np
import pytest
import tifffile
import zarr
from conftest import random_stack, tree_digest, write_params, write_slices

from pystack3d_dask import cli
from pystack3d_dask.engine import Project
from pystack3d_dask.errors import ConfigError, InputError, StoreError
from pystack3d_dask.store import LOCK_NAME, STORE_NAME

PARAMS = """
process_steps = ["cropping", "registration_calculation", "cropping_final"]
[cropping]
area = [1, 99999, 0, 99999]
[cropping_final]
area = [0, 30, 2, 40]
"""
CZ = 4
#: store layouts: 18 slices in chunks of 4 make 5 chunks (the last one short); shards of 2 chunks
#: make 3 shards (8, 8 and 2 slices); unsharded, the layout of formats 1 and 2, one file per chunk
LAYOUTS = {"sharded": dict(shard_chunks=2), "zstd": dict(shard_chunks=2, compression="zstd"),
           "unsharded": dict(shard_mib=0)}


@pytest.fixture
def project(tmp_path, request):
    """A complete project (a layout of :data:`LAYOUTS`, sharded by default) and its store's digest."""
    write_slices(tmp_path, random_stack((18, 48, 40)))
    write_params(tmp_path, PARAMS)
    Project(tmp_path, quiet=True, chunk_slices=CZ, **LAYOUTS[getattr(request, "param", "sharded")]).run()
    return tmp_path, tree_digest(tmp_path / STORE_NAME)


def unit_file(folder, node, i):
    """The file of write unit ``i`` (a shard, or a chunk when unsharded) of ``node``."""
    return folder / STORE_NAME / node / "c" / str(i) / "0" / "0"


def unit_slices(folder):
    """Slices per write unit of the project's store: 8 sharded, 4 unsharded."""
    return zarr.open_array(folder / STORE_NAME, path="input/_stats/_", mode="r").chunks[0]


def run(folder):
    return Project(folder, quiet=True, chunk_slices=CZ).run()


def cli_lines(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out.strip().splitlines(), out.err.strip().splitlines()


# -- 1. a damaged store is found before it is used, and repaired shard by shard ----------------------
@pytest.mark.parametrize("project", list(LAYOUTS), indirect=True)
@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_missing_or_truncated_unit_is_found_and_only_it_recomputed(project, damage, capsys):
    folder, before = project
    unit = unit_slices(folder)
    what = "chunk" if unit == CZ else "shard"
    path = unit_file(folder, "cropping/_", 1)
    if damage == "deleted":
        path.unlink()
    else:  # a compressed shard's size is unknown: its index, at the end, is cut
        path.write_bytes(path.read_bytes()[:-100])
    assert Project(folder).info()["steps"]["cropping"]["status"].startswith(f"damaged: cropping/_ {what} 1:")
    with pytest.raises(StoreError, match=rf"step 'cropping' .* is damaged \(cropping/_ {what} 1"):
        Project(folder).result("cropping")
    code, _, err = cli_lines(capsys, "export", str(folder), "--step", "cropping", str(folder / "out"))
    assert code == 2 and len(err) == 1 and "is damaged" in err[0] and not (folder / "out").exists()
    report = run(folder)
    assert report.computed == {"cropping": unit} and f"cropping: cropping/_ {what} 1" in report.messages[0]
    assert f"recomputing 1 {what}(s)" in report.messages[0]
    assert report.skipped == ["input", "registration_calculation", "cropping_final"]
    assert tree_digest(folder / STORE_NAME) == before


@pytest.mark.parametrize("project", ["sharded", "unsharded"], indirect=True)
def test_a_missing_unit_of_the_report_s_lines_is_found_and_recomputed(project):
    folder, before = project
    (folder / STORE_NAME / "cropping" / "_views" / "_" / "c" / "1" / "0").unlink()
    # a table's chunk is a write unit
    assert Project(folder).info()["steps"]["cropping"]["status"] == "damaged: cropping/_views/_ chunk 1: missing"
    assert run(folder).computed == {"cropping": unit_slices(folder)}
    assert tree_digest(folder / STORE_NAME) == before


@pytest.mark.parametrize("project", ["sharded", "unsharded"], indirect=True)
def test_corrupted_chunk_is_caught_by_its_checksum_then_verify_and_run_repair_it(project, capsys):
    folder, before = project
    unit = unit_slices(folder)
    path = unit_file(folder, "input/_", 1)  # its first chunk: slices unit:unit + 4
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size: only the checksum sees it
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"input/_ slices {unit}:{unit + CZ} in .* cannot be read \(Stored and "
                                         "computed checksum"):
        Project(folder).result("input").compute()
    code, out, _ = cli_lines(capsys, "verify", str(folder))
    where = "chunk 1" if unit == CZ else "shard 1, chunk 2"
    assert code == 1 and out[0].startswith(f"damaged: input [.] input/_ {where}: Stored and computed checksum")
    report = run(folder)
    assert report.computed == {"input": unit} and report.done == ["input"]
    assert tree_digest(folder / STORE_NAME) == before
    code, out, _ = cli_lines(capsys, "verify", str(folder))
    assert code == 0 and "every stored chunk matches" in out[0]


def test_damaged_shard_index_is_found_by_verify(project, capsys):
    folder, before = project
    path = unit_file(folder, "cropping/_", 0)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # in the index: the shard's size is right, its chunks are sound
    path.write_bytes(bytes(data))
    code, out, _ = cli_lines(capsys, "verify", str(folder))
    assert code == 1 and out[0].startswith("damaged: cropping [.] cropping/_ shard 0, chunk 0: Stored and computed")
    assert run(folder).computed == {"cropping": 8}
    assert tree_digest(folder / STORE_NAME) == before


def test_a_run_that_reads_a_corrupted_chunk_marks_it_and_the_next_run_repairs_it(project):
    folder, before = project
    path = unit_file(folder, "cropping/_", 1)  # the shard of slices 8:16
    data = bytearray(path.read_bytes())
    data[7] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"^cropping/_ \(from slice 8\) in .* cannot be read \(Stored and "
                                         r"computed checksum do not match.*\): it is marked for recomputation; "
                                         r"run again to recompute it.$"):
        Project(folder, quiet=True, chunk_slices=CZ).run(force=["cropping_final"])
    report = run(folder)
    assert report.computed == {"cropping": 8}  # the forced step failed: its old result stays
    assert tree_digest(folder / STORE_NAME) == before


def test_broken_array_metadata_recomputes_the_step(project, capsys):
    folder, before = project
    (folder / STORE_NAME / "cropping_final" / "_" / "zarr.json").write_text("{ broken")
    for command in (["info", str(folder)], ["export", str(folder), "--step", "cropping_final", str(folder / "o")],
                    ["report", str(folder), "--out", str(folder / "p")]):
        code, out, err = cli_lines(capsys, *command)
        if command[0] == "info":
            assert code == 0 and '"status": "damaged: cropping_final/_: metadata unreadable' in "\n".join(out)
        elif command[0] == "report":  # the page says so, with the figures of the sound steps
            page = (folder / "p" / "index.html").read_text()
            assert code == 0 and "damaged: cropping_final/_: metadata unreadable" in page
            assert '<section id="cropping">' in page and '<section id="cropping_final">' not in page
        else:
            assert code == 2 and len(err) == 1 and "damaged" in err[0], err
    report = run(folder)
    assert report.done == ["cropping_final"] and "recomputing the step" in report.messages[0]
    assert tree_digest(folder / STORE_NAME) == before


def test_foreign_stores_are_named_in_one_line(tmp_path, capsys):
    write_slices(tmp_path / "A", random_stack((6, 40, 40)))
    write_params(tmp_path, 'channels = ["A"]\n' + PARAMS)
    Project(tmp_path, quiet=True).run()
    other = tmp_path / "other"
    write_slices(other / "B", random_stack((6, 40, 40)))
    write_params(other, 'channels = ["B"]\n' + PARAMS)
    shutil.copytree(tmp_path / STORE_NAME, other / STORE_NAME)
    for command in ("info", "report"):
        code, _, err = cli_lines(capsys, command, str(other))
        assert code == 2 and err == [f"error: the store {other / STORE_NAME} holds channels ['A'], not this "
                                     "project's ['B']: it was written for another project."]
    shutil.rmtree(other / STORE_NAME)
    zarr.open_group(other / STORE_NAME, mode="w").create_array("x", shape=(2,), dtype="u1")
    before = tree_digest(other)
    with pytest.raises(StoreError, match="is a Zarr store not written by pystack3d-dask"):
        Project(other, quiet=True).run()
    assert {k: v for k, v in tree_digest(other).items() if k != LOCK_NAME} == before


def test_unknown_step_suggests_the_closest(project, capsys):
    folder, _ = project
    code, _, err = cli_lines(capsys, "export", str(folder), "--step", "croping_final", str(folder / "o"))
    assert code == 2 and "step 'croping_final' is not in this project (did you mean 'cropping_final'?)" in err[0]
    code, _, err = cli_lines(capsys, "preview", str(folder), "--step", "registration_calculaton")
    assert code == 2 and "(did you mean 'registration_calculation'?)" in err[0]


# -- 2. a failed run keeps the last good result ---------------------------------------------------
@pytest.mark.parametrize("how", ["changed", "forced"])
def test_a_step_failing_midway_leaves_the_store_as_it_was(project, monkeypatch, how):
    import pystack3d_dask.engine as engine

    folder, before = project
    if how == "changed":
        write_params(folder, PARAMS.replace("[1, 99999", "[2, 99999"))
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the computation failed")
        return write_block(*args)

    write_block = engine.write_block
    monkeypatch.setattr(engine, "write_block", failing)
    with pytest.raises(RuntimeError, match="the computation failed"):
        Project(folder, quiet=True, chunk_slices=CZ).run(force=["cropping"] if how == "forced" else ())
    assert {k: v for k, v in tree_digest(folder / STORE_NAME).items()} == before
    # the old results are still whole and readable, aliases included
    assert Project(folder).result("registration_calculation").shape == (18, 48, 39)
    monkeypatch.setattr(engine, "write_block", write_block)
    report = Project(folder, quiet=True, chunk_slices=CZ).run(force=["cropping"] if how == "forced" else ())
    assert report.done == ["cropping", "registration_calculation", "cropping_final"]


# -- 3. everything checkable is checked before work, in one line -------------------------------------
@pytest.mark.parametrize("text, match", [
    ('process_steps = ["registration_transformation"]\n[registration_transformation]\n'
     'constant_drift = [nan, inf]\n', r"\[registration_transformation\] constant_drift\[0\] = nan is invalid: "
                                      "expected a finite number"),
    ('process_steps = ["cropping"]\n[cropping]\narea = [0, 10, 0, 10]\n[destriping]\n'
     'filters = [{ name = "Gabor", noise_level = inf, sigma = [0.5, 20], theta = 0 }]\n',
     r"\[destriping\] filters\[0\].noise_level = inf is invalid"),
    ('process_steps = ["registration_calculation"]\n[registration_calculation]\narea = [100, 200, 0, 10]\n',
     r"\[registration_calculation\] area = \[100, 200, 0, 10\] leaves no pixel in an image of 16 x 16 px"),
    ('process_steps = ["registration_calculation"]\n[registration_calculation]\nnb_blocks = [2, 1]\n',
     r"\[registration_calculation\] nb_blocks = \[2, 1\] is invalid: it cuts the 16 x 16 px registration area"),
    ('process_steps = ["intensity_rescaling_area"]\n[intensity_rescaling_area]\narea = [0, 10, 50, 60]\n',
     r"\[intensity_rescaling_area\] area = \[0, 10, 50, 60\] leaves no pixel"),
    ('channels = ["../elsewhere"]\nprocess_steps = ["cropping"]\n[cropping]\narea = [0, 4, 0, 4]\n',
     r"channels = '../elsewhere' is invalid: expected a sub-folder of the project folder"),
])
def test_bad_parameters_are_found_before_any_work(tmp_path, text, match, capsys):
    write_slices(tmp_path, random_stack((5, 16, 16)))
    write_params(tmp_path, text)
    before = tree_digest(tmp_path)
    code, _, err = cli_lines(capsys, "run", str(tmp_path))
    assert code == 2 and len(err) == 1
    assert re.search(match, err[0]), err[0]
    assert {k: v for k, v in tree_digest(tmp_path).items() if k != LOCK_NAME} == before


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_chunk_size_options_are_checked(tmp_path, value, capsys):
    write_slices(tmp_path, random_stack((5, 16, 16)))
    write_params(tmp_path, PARAMS)
    code, _, err = cli_lines(capsys, "run", str(tmp_path), "--chunk-mib", value)
    assert code == 2 and err == [f"error: chunk_mib = {float(value)!r} is invalid: expected a finite number of "
                                 "MiB > 0."]
    assert not (tmp_path / STORE_NAME).exists()


def test_two_channels_stored_under_one_name_and_empty_slices(tmp_path):
    with pytest.raises(ConfigError, match=r"channels 'a/b' and 'a_b' would be stored under one name \('a_b'\)"):
        Project({"channels": ["a/b", "a_b"], "process_steps": ["cropping"], "cropping": {"area": [0, 1, 0, 1]},
                 "project_dir": str(tmp_path)})
    write_slices(tmp_path, random_stack((3, 8, 8)))
    with pytest.warns(UserWarning, match="zero-size array"):
        tifffile.imwrite(tmp_path / "slice_3_z=0.0300um.tif", np.zeros((0, 8), np.uint8))
    write_params(tmp_path, PARAMS)
    with pytest.raises(InputError, match=r"slice_3_z=0.0300um.tif holds an empty image"):
        Project(tmp_path, quiet=True).run()


@pytest.mark.parametrize("arr, match", [
    (np.zeros((0, 4, 4)), r"empty array of shape \(0, 4, 4\)"),
    (np.zeros((2, 4, 4), bool), "got dtype bool"),
    (np.zeros((2, 2, 4, 4)), r"got an array of shape \(2, 2, 4, 4\)"),
])
def test_api_arrays_are_checked(arr, match):
    from pystack3d_dask.api import crop

    with pytest.raises(ValueError, match=match):
        crop(arr, area=(0, 2, 0, 2))


def test_disk_full_is_one_line_and_the_rerun_resumes(project, monkeypatch, capsys):
    import pystack3d_dask.store as store

    folder, _ = project
    clean = tree_digest(folder / STORE_NAME)
    write_params(folder, PARAMS.replace("[1, 99999", "[2, 99999"))
    write_shard, calls = store.write_shard, []

    def full(path, *args, **kwargs):  # the disk fills up at the second shard of cropping (8 slices)
        calls.append("cropping~new/_/c/" in str(path))
        if sum(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_shard(path, *args, **kwargs)

    monkeypatch.setattr(store, "write_shard", full)
    before = tree_digest(folder / STORE_NAME)
    code, _, err = cli_lines(capsys, "-q", "run", str(folder), "--chunk-mib", "0.0075")  # 4 slices: 4 x 48 x 38 B
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: the disk holding {folder / STORE_NAME} is full: ")
    assert err[0].endswith("a shard needs 14.2 KiB; free some space and run again to resume.")  # 2 chunks
    monkeypatch.setattr(store, "write_shard", write_shard)
    done = {k: v for k, v in tree_digest(folder / STORE_NAME).items() if "~new" not in k}
    assert done == before  # the complete results are untouched; written chunks wait in cropping~new
    entry = Project(folder).info()["steps"]["cropping"]
    assert entry["status"] == "complete" and re.fullmatch(r"being computed \(\d/3 shards\): run again to finish it",
                                                          entry["next"])
    report = Project(folder, quiet=True, chunk_slices=CZ).run()
    assert 0 < report.computed["cropping"] < 18  # resumed
    write_params(folder, PARAMS)
    Project(folder, quiet=True, chunk_slices=CZ).run()
    assert tree_digest(folder / STORE_NAME) == clean


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
@pytest.mark.parametrize("shape, cz, sz", [((10, 5, 3), 2, 6), ((7, 4, 4), 1, 1), ((9, 3, 2), 3, 9), ((5, 2, 2), 5, 5)])
def test_shards_are_written_as_zarr_writes_them(tmp_path, dtype, shape, cz, sz, compression):
    """Byte for byte, the last shard short of chunks and its last chunk padded included."""
    from pystack3d_dask.store import ARRAY_CONFIG, CHECKSUM, COMPRESSION, _shard_encoder, write_shard

    data = random_stack(shape, dtype)
    data[: shape[0] // 2] //= 16  # something to compress
    arr = zarr.create_array(tmp_path / "z.zarr", shape=shape, chunks=(cz,) + shape[1:], shards=(sz,) + shape[1:],
                            dtype=dtype, compressors=COMPRESSION[compression] + CHECKSUM, config=ARRAY_CONFIG,
                            fill_value=0)
    arr[:] = data
    encode = _shard_encoder(zarr.open_array(tmp_path / "z.zarr"))  # as a write task opens it
    assert encode is not None
    for i in range(-(-shape[0] // sz)):
        blocks = [data[j : min(j + cz, shape[0])] for j in range(i * sz, min((i + 1) * sz, shape[0]), cz)]
        write_shard(tmp_path / "ours", blocks, chunk=cz, per_shard=sz // cz, fill_value=0, encode=encode)
        assert (tmp_path / "ours").read_bytes() == (tmp_path / "z.zarr" / "c" / str(i) / "0" / "0").read_bytes()


# -- 4. change detection that users can trust ----------------------------------------------------
def test_a_store_of_format_2_keeps_its_layout_until_the_input_is_ingested_again(tmp_path):
    write_slices(tmp_path, random_stack((18, 48, 40)))
    write_params(tmp_path, PARAMS)
    Project(tmp_path, quiet=True, chunk_slices=CZ, shard_mib=0).run(["cropping"])
    root = zarr.open_group(tmp_path / STORE_NAME, mode="r+")
    root.attrs["pystack3d_dask"] = {**root.attrs["pystack3d_dask"], "format": 2}  # as format 2 wrote it

    def shards():
        return {step: zarr.open_array(tmp_path / STORE_NAME, path=f"{step}/_", mode="r").shards
                for step in ("input", "cropping", "cropping_final")}

    report = run(tmp_path)
    assert report.skipped == ["input", "cropping"] and report.done == ["registration_calculation", "cropping_final"]
    assert set(shards().values()) == {None}
    before = tree_digest(tmp_path / STORE_NAME)
    with pytest.raises(InputError, match=r"\(shards of 8 slices, unsharded at ingest \(shard size options\)\)"):
        Project(tmp_path, quiet=True, chunk_slices=CZ, shard_chunks=2).run()
    assert tree_digest(tmp_path / STORE_NAME) == before
    final = Project(tmp_path).result("cropping_final").compute()
    report = Project(tmp_path, quiet=True, chunk_slices=CZ, shard_chunks=2).run(force=["input"])
    assert report.done == ["input", "cropping", "registration_calculation", "cropping_final"]
    assert shards() == {"input": (8, 48, 40), "cropping": (8, 48, 39), "cropping_final": (8, 38, 30)}
    np.testing.assert_array_equal(Project(tmp_path).result("cropping_final").compute(), final)


def test_ind_max_past_the_end_changes_nothing(project):
    folder, before = project
    write_params(folder, "ind_max = 99999\n" + PARAMS)
    assert run(folder).done == []
    write_params(folder, "ind_max = 17\nind_min = 0\n" + PARAMS)
    assert run(folder).done == []
    assert tree_digest(folder / STORE_NAME) == before


def test_moved_or_replaced_input_is_named_and_confirmed(project):
    folder, before = project
    first = folder / "slice_3_z=0.0300um.tif"
    first.rename(folder / "moved.tif")
    with pytest.raises(InputError, match=r"1 file\(s\) gone \(slice_3_z=0.0300um.tif\), 1 file\(s\) new "
                                         r"\(moved.tif\)\): every step would be recomputed.*--force input"):
        run(folder)
    (folder / "moved.tif").rename(first)
    os.utime(first)  # touched, same pixels: not a change
    assert run(folder).done == []
    before = tree_digest(folder / STORE_NAME)  # the new times are recorded: no second read of the file
    # other pixels of the same size and the same modification time (cp -p, rsync -a)
    stat = first.stat()
    other = random_stack((1, 48, 40), seed=7)[0]
    tifffile.imwrite(first, other)
    assert first.stat().st_size == stat.st_size
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(InputError, match=r"slice_3_z=0.0300um.tif: other pixels than at ingest \(same size\)"):
        run(folder)
    assert {k: v for k, v in tree_digest(folder / STORE_NAME).items()} == before
    report = Project(folder, quiet=True, chunk_slices=CZ).run(force=["input"])
    assert report.done == ["input", "cropping", "registration_calculation", "cropping_final"]
    np.testing.assert_array_equal(Project(folder).result("input")[3].compute(), other)


# -- 5. export that survives interruption ----------------------------------------------------------
def test_interrupted_export_is_completed_by_a_rerun(project, monkeypatch):
    folder, _ = project
    project_ = Project(folder)
    clean = tree_digest(project_.export("cropping_final", folder / "clean"))
    imwrite, calls = tifffile.imwrite, []

    def killed(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 7:
            path.write_bytes(b"II*\0")  # half a file, then the process dies
            raise KeyboardInterrupt
        return imwrite(path, *args, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", killed)
    with pytest.raises(KeyboardInterrupt):
        project_.export("cropping_final", folder / "out")
    monkeypatch.setattr(tifffile, "imwrite", imwrite)
    assert len([p for p in (folder / "out").glob("*.tif")]) == 6  # only whole files under their names
    project_.export("cropping_final", folder / "out")
    assert tree_digest(folder / "out") == clean
    with pytest.raises(StoreError, match="not empty and holds no unfinished export of this result"):
        project_.export("cropping", folder / "out")


def test_only_a_run_removes_files_a_killed_write_left(project):
    """A reader must never delete a running writer's temporary files; the next run (under the
    lock) removes those a killed writer left."""
    folder, _ = project
    left = folder / STORE_NAME / "cropping" / "_" / "c" / "0" / "0" / "0.d0e1f2.partial"
    left.write_bytes(b"half a chunk")
    Project(folder, quiet=True).info()
    Project(folder, quiet=True).result("cropping").compute()
    assert left.exists()
    run(folder)
    assert not left.exists()
