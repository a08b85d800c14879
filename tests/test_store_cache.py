"""The attributes a ProjectStore keeps are never stale: after every operation that writes,
swaps, renames or deletes a group, a cached read equals a read from a fresh store."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import random_stack, write_params, write_slices

from pystack3d_dask.engine import Project
from pystack3d_dask.store import NEW, OLD, ProjectStore

GROUPS = ("input", "a", "a" + NEW, "a" + OLD, "b", "b" + NEW)


def read_all(store: ProjectStore) -> dict:
    return {name: store.info(name) for name in GROUPS}


def check(store: ProjectStore, operation, *args, **kwargs) -> None:
    """Fill the store's cache, apply ``operation``, then compare its reads with an uncached store."""
    read_all(store)
    operation(*args, **kwargs)
    assert read_all(store) == read_all(ProjectStore(store.path)), operation.__name__


@pytest.fixture
def store(tmp_path):
    store = ProjectStore(tmp_path / "s.zarr")
    store.set_meta(channels=["."])
    store.set_info("input", hash="h0", complete=True)
    store.set_info("a", hash="h1", complete=True, zpos=[0.0, 1.0])
    store.create_result("a", ".", (4, 3, 2), 2, "u1")
    return store


def test_every_write_rename_and_delete_is_seen_by_the_next_read(store):
    check(store, store.set_info, "a", complete=False)
    check(store, store.set_info, "b", hash="h2")  # a group created
    check(store, store.create_result, "b" + NEW, ".", (4, 3, 2), 2, "u1")
    check(store, store.save_state, "b" + NEW, "_shared", {"m": np.eye(3), "n": 2})
    check(store, store.set_info, "b" + NEW, hash="h3", complete=True)
    check(store, store.commit, "b", "b" + NEW)  # the swap: b~new becomes b
    assert store.info("b")["hash"] == "h3" and store.info("b" + NEW) is None
    check(store, store.mark_undone, "b", "b/_", [1])
    check(store, store.delete_state, "b", "_shared")
    check(store, store.discard, "a", ["_"])
    assert store.info("a")["discarded"]
    target = store.begin("a", "h4")
    check(store, store.set_info, target, hash="h4", complete=False)
    check(store, store.abort, "a")
    check(store, store.delete, "b")
    check(store, store.set_meta, channels=["."])


def test_a_swap_left_half_done_by_a_killed_run_is_seen_after_recover(store):
    store.set_info("a" + NEW, hash="new", complete=True)
    read_all(store)
    os.replace(store.path / "a", store.path / ("a" + OLD))  # killed between the two renames
    check(store, store.recover)
    assert store.info("a")["hash"] == "new" and store.info("a" + OLD) is None


def test_info_returns_a_copy(store):
    info = store.info("a")
    info["hash"] = "changed"
    assert store.info("a")["hash"] == "h1"


def test_runs_swap_and_resume_through_the_cache(tmp_path):
    """A recomputed step is swapped in, a failed one leaves the old result, a resumed run finishes it."""
    write_slices(tmp_path, random_stack((6, 16, 12)))
    toml = write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [1, 99999, 0, 99999]\n')
    project = Project(toml, chunk_slices=2, shard_chunks=1, quiet=True)
    project.run(plots=False)
    first = project.result("cropping").compute()
    write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [2, 99999, 0, 99999]\n')
    project = Project(toml, chunk_slices=2, shard_chunks=1, quiet=True)
    assert project.run(plots=False).done == ["cropping"]
    assert project.result("cropping").shape[2] == first.shape[2] - 1
    assert project.run(plots=False).skipped == ["input", "cropping"]  # complete: read back from the store
    store = ProjectStore(project.store_path)
    store.mark_undone("cropping", "cropping/_", [1])  # as verify does for a damaged shard (of 2 slices)
    report = project.run(plots=False)
    assert report.done == ["cropping"] and report.computed["cropping"] == 2
    np.testing.assert_array_equal(project.result("cropping").compute(), first[:, :, 1:])
