"""The engine: chunking- and scheduler-independent results, resume, change detection, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from conftest import random_stack, tree_digest, write_params, write_slices

from pystack3d_dask.engine import Project
from pystack3d_dask.errors import ConfigError, InputError, StoreError
from pystack3d_dask.store import LOCK_NAME, project_lock

PARAMS = """
process_steps = ["cropping", "cropping_final"]
channels = {channels}
[cropping]
area = [2, 99999, 1, 99999]
[cropping_final]
area = [1, 15, 3, 20]
"""


def make_project(tmp_path, *, channels=("A", "B"), shape=(13, 24, 20), dtype="uint8", extra=""):
    stacks = {}
    for i, ch in enumerate(channels):
        stacks[ch] = random_stack(shape, dtype, seed=i)
        write_slices(tmp_path / ch, stacks[ch])
    write_params(tmp_path, PARAMS.format(channels=list(channels)) + extra)
    return stacks


def expected(stack):
    h = stack.shape[1]
    first = stack[:, : h - 1, 2:]  # [cropping] ymin=1 drops the bottom row, xmin=2 two columns
    h1 = first.shape[1]
    return first[:, h1 - 20 : h1 - 3, 1:15]


def store_content(project, steps=("input", "cropping", "cropping_final")):
    out = {}
    for step in steps:
        for ch in project.config.channels:
            out[step, ch] = (project.result(step, ch).compute(), project.stats(step, ch))
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key][0], b[key][0])
        for name in a[key][1]:
            np.testing.assert_array_equal(a[key][1][name], b[key][1][name], err_msg=f"{key} {name}")


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_multichannel_chain_exact(tmp_path, dtype):
    stacks = make_project(tmp_path, dtype=dtype)
    project = Project(tmp_path, quiet=True)
    report = project.run()
    assert report.done == ["input", "cropping", "cropping_final"]
    for ch, stack in stacks.items():
        out = project.result("cropping_final", ch)
        assert out.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(out.compute(), expected(stack))
        stats = project.stats("cropping_final", ch)
        np.testing.assert_allclose(stats["mean"], expected(stack).reshape(13, -1).mean(axis=1, dtype=np.float64))
        np.testing.assert_allclose(stats["input_max"], stack[:, :-1, 2:].reshape(13, -1).max(axis=1))
    # no resampling table: the names are read with PyStack3D's default policy (for the export scale)
    np.testing.assert_allclose(project.zpos("cropping_final"), np.arange(13) * 0.01)


def test_results_do_not_depend_on_chunking_sharding_or_scheduler(tmp_path, local_cluster):
    runs = {}
    # shards: of the whole stack (the default for small stacks), of several chunks (the last one
    # short), of one chunk; unsharded (the layout of stores of format 1 and 2)
    for name, kwargs, shard in [("1", dict(chunk_slices=1), 13), ("5", dict(chunk_slices=5, shard_chunks=2), 10),
                                ("all", dict(chunk_slices=13), 13),
                                ("unsharded", dict(chunk_slices=5, shard_mib=0), None),
                                ("zstd", dict(chunk_slices=5, compression="zstd", shard_chunks=2), 10),
                                ("local", dict(chunk_slices=3, shard_chunks=2, cluster={
                                    "type": "local", "n_workers": 2, "memory_limit": "1GiB"}), 6),
                                ("cluster", dict(chunk_slices=4, shard_chunks=1,
                                                 cluster=local_cluster.scheduler_address), 4)]:
        folder = tmp_path / name
        make_project(folder)
        project = Project(folder, quiet=True, **kwargs)
        project.run()
        for step in ("input", "cropping", "cropping_final"):
            arr = zarr.open_array(project.store_path, path=f"{step}/A", mode="r")
            assert arr.chunks[0] == kwargs["chunk_slices"] and (arr.shards and arr.shards[0]) == shard
        runs[name] = store_content(project)
    for name in ("5", "all", "unsharded", "zstd", "local", "cluster"):
        assert_same(runs["1"], runs[name])


def test_rerun_skips_and_changes_recompute_what_follows(tmp_path):
    make_project(tmp_path)
    project = Project(tmp_path, quiet=True)
    project.run()
    before = store_content(project)
    report = Project(tmp_path, quiet=True).run()
    assert report.done == [] and report.skipped == ["input", "cropping", "cropping_final"]
    # change the last step only: the first is kept
    (tmp_path / "params.toml").write_text(PARAMS.format(channels=["A", "B"]).replace("[1, 15, 3, 20]",
                                                                                     "[1, 16, 3, 20]"))
    report = Project(tmp_path, quiet=True).run()
    assert report.done == ["cropping_final"] and "cropping_final: recomputing" in report.messages[0]
    # change the first: both are recomputed; back to the start: both again, same bytes
    (tmp_path / "params.toml").write_text(PARAMS.format(channels=["A", "B"]).replace("[2, 99999", "[3, 99999"))
    assert Project(tmp_path, quiet=True).run().done == ["cropping", "cropping_final"]
    (tmp_path / "params.toml").write_text(PARAMS.format(channels=["A", "B"]))
    assert Project(tmp_path, quiet=True).run().done == ["cropping", "cropping_final"]
    assert_same(before, store_content(Project(tmp_path, quiet=True)))
    report = Project(tmp_path, quiet=True).run(force=["cropping"])
    assert report.done == ["cropping", "cropping_final"] and "forced" in report.messages[0]
    report = Project(tmp_path, quiet=True).run(["cropping"], force=["cropping"])
    assert report.done == ["cropping"]
    with pytest.raises(ConfigError, match="'bkg_removal' is not among the steps to run"):
        project.run(force=["bkg_removal"])


def test_history_skips_steps_done(tmp_path):
    make_project(tmp_path, extra="")
    text = (tmp_path / "params.toml").read_text()
    (tmp_path / "params.toml").write_text('history = ["cropping"]\n' + text)
    with pytest.warns(UserWarning, match="history lists"):
        report = Project(tmp_path, quiet=True).run()
    assert report.done == ["input", "cropping_final"]


def test_a_second_run_is_refused_while_one_runs(tmp_path):
    make_project(tmp_path)
    with project_lock(tmp_path):
        with pytest.raises(StoreError, match=r"another pystack3d-dask run \(pid \d+\) is working on"):
            Project(tmp_path, quiet=True).run()
    Project(tmp_path, quiet=True).run()  # the lock dies with its holder
    assert (tmp_path / LOCK_NAME).exists()


def corrupt(path):
    path.write_bytes(path.read_bytes()[:-200])


@pytest.mark.parametrize("scheduler", ["threads", "cluster"])
def test_corrupt_tiff_is_named_and_leaves_nothing(tmp_path, scheduler, local_cluster):
    make_project(tmp_path)
    corrupt(tmp_path / "B" / "slice_7_z=0.0700um.tif")
    before = tree_digest(tmp_path)
    cluster = local_cluster.scheduler_address if scheduler == "cluster" else None
    with pytest.raises(InputError, match=r"B/slice_7_z=0.0700um.tif"):
        Project(tmp_path, quiet=True, chunk_slices=3, cluster=cluster).run()
    after = tree_digest(tmp_path)
    after.pop(LOCK_NAME, None)
    assert after == before  # no store left, input untouched


def test_step_error_leaves_the_store_as_it_was(tmp_path):
    make_project(tmp_path)
    Project(tmp_path, quiet=True).run(["cropping"])
    store = tmp_path / "pystack3d_dask.zarr"
    before = tree_digest(store)
    (tmp_path / "params.toml").write_text(PARAMS.format(channels=["A", "B"]).replace("[1, 15, 3, 20]",
                                                                                     "[500, 600, 3, 20]"))
    with pytest.raises(ConfigError, match=r"\[cropping_final\] area = \[500, 600, 3, 20\] leaves no pixel"):
        Project(tmp_path, quiet=True).run()
    assert tree_digest(store) == before


def test_unwritable_output(tmp_path):
    make_project(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match=r"output folder .*file/out is not writable"):
        Project(tmp_path, quiet=True, output_dir=blocker / "out").run()


def test_inconsistent_input_is_named_before_any_work(tmp_path):
    make_project(tmp_path)
    tifffile.imwrite(tmp_path / "A" / "slice_4_z=0.0400um.tif", np.zeros((24, 21), np.uint8))
    before = tree_digest(tmp_path)
    with pytest.raises(InputError, match="slice_4_z=0.0400um.tif is 21 x 24 px"):
        Project(tmp_path, quiet=True).run()
    assert {k: v for k, v in tree_digest(tmp_path).items() if k != LOCK_NAME} == before
    with pytest.raises(InputError, match="channel folder .*C.* does not exist"):
        Project({**_table(tmp_path), "channels": ["B", "C"]}, quiet=True).run()


def _table(folder):
    import tomllib

    with open(folder / "params.toml", "rb") as fh:
        return {**tomllib.load(fh), "project_dir": str(folder)}


def test_output_dir_and_export(tmp_path):
    stacks = make_project(tmp_path, channels=(".",))
    project = Project(tmp_path, quiet=True, output_dir=tmp_path / "out")
    project.run()
    folder = project.export("cropping_final", tmp_path / "tiffs")
    files = sorted(folder.glob("*.tif"))
    assert len(files) == 13
    np.testing.assert_array_equal(tifffile.imread(files[0]), expected(stacks["."])[0])
    project.export("cropping_final", tmp_path / "tiffs")  # the same export again: nothing to add
    with pytest.raises(StoreError, match="not empty"):
        project.export("cropping", tmp_path / "tiffs")
    info = project.info()
    assert info["steps"]["cropping_final"]["status"] == "complete"
    assert info["steps"]["cropping_final"]["shape"] == (13, 17, 14)


def test_write_pass_reduction_and_known_input_stats(tmp_path):
    """Histograms after intensity_rescaling come from the write pass; min/max from the stored stats."""
    from pystack3d_dask.kernels.histmatch import histograms

    stack = random_stack((9, 16, 12), "uint16")
    write_slices(tmp_path, stack)
    write_params(tmp_path, 'process_steps = ["intensity_rescaling"]\n[intensity_rescaling]\nnbins = 16\n')
    project = Project(tmp_path, quiet=True, chunk_slices=4)
    project.run()
    state = project.state("intensity_rescaling")
    assert state["range_bins"] == [float(stack.min()), float(stack.max())]
    result = project.result("intensity_rescaling").compute()
    np.testing.assert_array_equal(state["histograms_after"], histograms(result, edges=state["edges"]))


def test_policy_that_does_not_match_the_file_names(tmp_path):
    stack = random_stack((5, 8, 8))
    write_slices(tmp_path, stack, prefix="img")  # img_0_z=0.0000um.tif, not slice_...
    write_params(tmp_path, 'process_steps = ["resampling"]\n[resampling]\ndz = 0.01\n'
                           'policy = "slice_{slice_nb}_z={z_coord}um.tif"\n')
    before = tree_digest(tmp_path)
    with pytest.raises(InputError, match=r"img_0_z=0.0000um.tif.*slice_\{slice_nb\}_z=\{z_coord\}um.tif"):
        Project(tmp_path, quiet=True).run()
    assert {k: v for k, v in tree_digest(tmp_path).items() if k != LOCK_NAME} == before
    # without a resampling step to run, the policy is not needed: no error, no z positions
    write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [0, 4, 0, 4]\n'
                           '[resampling]\ndz = 0.01\npolicy = "slice_{slice_nb}_z={z_coord}um.tif"\n')
    project = Project(tmp_path, quiet=True)
    project.run()
    assert project.zpos("cropping") is None


def test_z_positions_flow_through_the_steps(tmp_path):
    zpos = np.array([0.0, 0.01, 0.02, 0.04, 0.06, 0.08])
    stack = random_stack((6, 8, 8), "float32")
    write_slices(tmp_path, stack, zpos=zpos)
    write_params(tmp_path, 'process_steps = ["cropping", "resampling"]\n[cropping]\narea = [0, 4, 0, 4]\n'
                           '[resampling]\ndz = 0.01\n')
    project = Project(tmp_path, quiet=True, chunk_slices=4)
    project.run()
    np.testing.assert_allclose(project.zpos("cropping"), zpos)
    np.testing.assert_allclose(project.zpos("resampling"), np.arange(9) * 0.01, atol=1e-12)
    out = project.result("resampling").compute()
    np.testing.assert_array_equal(out[4], stack[3, 4:, :4])  # z = 0.04 is input slice 3
    np.testing.assert_allclose(out[5], (stack[3, 4:, :4] + stack[4, 4:, :4]) / 2, rtol=1e-6)


def test_batch_cluster_without_dask_jobqueue_says_what_to_install(tmp_path):
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        make_project(tmp_path)
        with pytest.raises(ConfigError, match=r'pip install "pystack3d-dask\[hpc\]"'):
            Project(tmp_path, quiet=True, cluster={"type": "slurm"}).run()
        assert not (tmp_path / "pystack3d_dask.zarr").exists()
    else:
        pytest.skip("dask-jobqueue is installed")


def test_results_of_unknown_steps_or_channels_are_clear_errors(tmp_path):
    make_project(tmp_path)
    project = Project(tmp_path, quiet=True)
    with pytest.raises(StoreError, match="no store at"):
        project.result("cropping")
    project.run(["cropping"])
    with pytest.raises(StoreError, match="step 'cropping_final' has no complete result"):
        project.result("cropping_final")
    with pytest.raises(ConfigError, match=r"channel = 'C' is invalid: expected one of \['A', 'B'\]"):
        project.stats("cropping", "C")


def test_keep_last_stores_only_the_input_and_the_last_images(tmp_path):
    stacks = make_project(tmp_path)
    project = Project(tmp_path, quiet=True, keep="last", chunk_slices=4)
    project.run()
    store = tmp_path / "pystack3d_dask.zarr"
    assert not (store / "cropping" / "A").exists() and (store / "cropping_final" / "A").exists()
    np.testing.assert_array_equal(project.result("cropping_final", "B").compute(), expected(stacks["B"]))
    assert len(project.stats("cropping", "A")["mean"]) == 13  # statistics and state stay
    assert not project.has_images("cropping") and project.has_images("cropping_final")
    with pytest.raises(StoreError, match=r"images of step 'cropping' were discarded \(keep='last'\)"):
        project.result("cropping", "A")
    assert Project(tmp_path, quiet=True, keep="last", chunk_slices=4).run().done == []
    # the last step changes: its input images are gone, so the step before is computed again
    (tmp_path / "params.toml").write_text(PARAMS.format(channels=["A", "B"]).replace("[1, 15, 3, 20]",
                                                                                     "[1, 16, 3, 20]"))
    report = Project(tmp_path, quiet=True, keep="last", chunk_slices=4).run()
    assert report.done == ["cropping", "cropping_final"]
    h = stacks["A"].shape[1] - 1
    np.testing.assert_array_equal(Project(tmp_path).result("cropping_final", "A").compute(),
                                  stacks["A"][:, :h, 2:][:, h - 20 : h - 3, 1:16])


def test_clipping_warning_names_the_table_of_the_area(tmp_path):
    make_project(tmp_path, channels=("A",), extra="")
    text = (tmp_path / "params.toml").read_text().replace("area = [1, 15, 3, 20]", "area = [1, 40, 3, 20]")
    (tmp_path / "params.toml").write_text(text)
    with pytest.warns(UserWarning) as caught:
        Project(tmp_path, quiet=True).run()
    said = [str(w.message) for w in caught if "reaches past" in str(w.message)]
    assert said and all(m.startswith("[cropping_final] area = [1, 40, 3, 20]") for m in said), said


def test_a_step_is_given_the_states_of_the_steps_it_requires(tmp_path, monkeypatch):
    seen = []
    ctx = Project._ctx

    def spy(self, channel, zpos, distributed, previous, input_stats):
        seen.append(sorted(previous))
        return ctx(self, channel, zpos, distributed, previous, input_stats)

    monkeypatch.setattr(Project, "_ctx", spy)
    write_slices(tmp_path, random_stack((6, 32, 32)))
    write_params(tmp_path, 'process_steps = ["bkg_removal", "registration_calculation", "registration_transformation"]\n'
                           '[bkg_removal]\norders = [1, 1, 0]\n')
    Project(tmp_path, quiet=True).run(plots=False)
    assert seen == [[], [], ["registration_calculation"]]  # not bkg_removal's, although it has one
