"""The whole chain through the engine: every step's stored result is the same for any chunking,
sharding and scheduler (the steps' own tests check this step by step on bare arrays)."""

from __future__ import annotations

import numpy as np
import pytest

from pystack3d_dask.demo import write_demo_project
from pystack3d_dask.engine import Project


@pytest.fixture(scope="module")
def runs(tmp_path_factory, local_cluster):
    out = {}
    # shards of 1 chunk, of 2 (the last shard short), of the whole stack; 3 on a cluster
    variants = {"1": {"chunk_slices": 1, "shard_chunks": 1}, "7": {"chunk_slices": 7, "shard_chunks": 2},
                "all": {"chunk_slices": 1000},
                "cluster": {"chunk_slices": 5, "shard_chunks": 3, "cluster": local_cluster.scheduler_address}}
    for name, kwargs in variants.items():
        toml, _ = write_demo_project(tmp_path_factory.mktemp(f"chain{name}"), shape=(36, 48, 48))
        project = Project(toml, quiet=True, **kwargs)
        project.run()
        out[name] = {step: project.result(step).compute() for step in project.config.process_steps}
    toml, _ = write_demo_project(tmp_path_factory.mktemp("chainlast"), shape=(36, 48, 48))
    project = Project(toml, quiet=True, chunk_slices=7, keep="last")
    project.run()
    out["last"] = {step: project.result(step).compute() for step in project.config.process_steps
                   if project.has_images(step)}
    return out


@pytest.mark.parametrize("variant", ["7", "all", "cluster"])
def test_every_step_is_identical_whatever_the_chunking_and_scheduler(runs, variant):
    for step, expected in runs["1"].items():
        np.testing.assert_array_equal(runs[variant][step], expected, err_msg=step)


def test_keep_last_gives_the_same_final_images(runs):
    last = runs["last"]
    # left: the last images, and cropping's, which are the input's (a crop to the whole image is no copy)
    assert list(last) == ["cropping", "cropping_final"]
    for step, images in last.items():
        np.testing.assert_array_equal(images, runs["1"][step], err_msg=step)
