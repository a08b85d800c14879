"""The run's worker processes for GIL-bound kernels: where tasks run, same results, lifetime."""

from __future__ import annotations

import os
import time

import dask
import numpy as np
import psutil
import pytest
from conftest import write_params, write_slices

from pystack3d_dask import processes
from pystack3d_dask.engine import Project
from pystack3d_dask.processes import kernel_pool
from pystack3d_dask.steps.base import as_stack
from pystack3d_dask.steps.destriping import destriping
from pystack3d_dask.synthetic import make_case

GABOR = {"name": "Gabor", "noise_level": 20, "sigma": (0.5, 20), "theta": 0}


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


def workers_gone(before: set[int], grace: float = 30) -> bool:
    """Every process started since ``before`` has ended, but the fork server and the resource
    tracker that Python keeps while this process lives."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        left = {pid for pid in descendants() - before
                if "from multiprocessing." not in " ".join(psutil.Process(pid).cmdline())}
        if not left:
            return True
        time.sleep(0.1)
    return False


def test_run_calls_in_place_without_a_pool():
    assert processes.pool() is None
    assert processes.run(os.getpid) == os.getpid()
    with kernel_pool(1):  # nproc 1: no pool
        assert processes.pool() is None and processes.run(os.getpid) == os.getpid()


def test_run_uses_the_pool_and_the_pool_closes_with_the_block():
    before = descendants()
    with kernel_pool(2):
        pool = processes.pool()
        assert processes.pool() is pool  # one pool for the block
        pids = {processes.run(os.getpid) for _ in range(8)}
        assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert processes.pool() is None
    assert workers_gone(before)


def test_an_error_kills_the_workers_at_once():
    """A task of minutes (a large VSNR slice) is not waited for when the run stops."""
    before = descendants()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt), kernel_pool(2):
        processes.pool().submit(time.sleep, 600)
        time.sleep(0.5)
        raise KeyboardInterrupt  # what Ctrl-C, or SIGTERM turned into an exception, raises
    assert time.monotonic() - start < 60
    assert workers_gone(before)


@pytest.mark.parametrize("chunks", [1, 3, 11])
@pytest.mark.parametrize("method", [{"filters": [GABOR], "maxit": 30, "cvg_threshold": 1e-3},
                                    {"wavelet_decomposition": {"level": 1}}], ids=["vsnr", "wavelet"])
def test_destriping_in_processes_is_identical_to_threads(chunks, method):
    stack = make_case((11, 64, 60), defects=("curtains",)).stack.astype(np.float32)
    stack[2, :5, :7] = np.nan  # NaN pixels are filled in the worker and come back NaN
    x = as_stack(stack, chunk_slices=chunks)
    with dask.config.set(scheduler="threads", num_workers=2):
        ref = destriping(x, **method)[0].compute()
        with kernel_pool(2):
            pids = set()
            real = processes.run

            def spy(fn, *args, **kwargs):
                pids.add(processes.pool().submit(os.getpid).result())
                return real(fn, *args, **kwargs)

            processes.run = spy
            try:
                got = destriping(x, **method)[0].compute()
            finally:
                processes.run = real
    assert pids and os.getpid() not in pids
    np.testing.assert_array_equal(got, ref)
    assert np.isnan(got[2, :5, :7]).all()


RUN = """
nproc = {nproc}
process_steps = {steps}
[destriping]
maxit = 20
filters = [{{ name = "Gabor", noise_level = 20, sigma = [0.5, 20], theta = 0 }}]
[registration_calculation]
transformation = "TRANSLATION"
[cropping]
area = [0, 30, 0, 40]
"""


@pytest.fixture
def pools(monkeypatch):
    """The KernelPools started, in order."""
    started = []
    real = processes.KernelPool

    class Recorded(real):
        def __init__(self, nproc):
            super().__init__(nproc)
            started.append(self)

    monkeypatch.setattr(processes, "KernelPool", Recorded)
    return started


@pytest.mark.parametrize(("steps", "nproc", "expected"), [
    (["registration_calculation", "destriping"], 2, 1),  # one pool for both steps
    (["cropping"], 2, 0),  # no step that uses one
    (["registration_calculation", "destriping"], 1, 0),  # nproc 1: tasks in place
])
def test_a_run_starts_one_pool_when_a_step_uses_it(tmp_path, pools, steps, nproc, expected):
    write_slices(tmp_path, make_case((8, 48, 40), defects=("curtains",)).stack)
    write_params(tmp_path, RUN.format(nproc=nproc, steps=steps))
    before = descendants()
    Project(tmp_path, quiet=True).run(plots=False)
    assert len(pools) == expected
    assert workers_gone(before)


def test_a_run_starts_the_pool_before_its_first_step(tmp_path, pools, monkeypatch):
    """The workers start while ingest and the light steps compute, not when destriping needs them."""
    seen = []
    real = Project._run_step

    def spy(self, store, step, *args, **kwargs):
        seen.append((step.name, len(pools)))
        return real(self, store, step, *args, **kwargs)

    monkeypatch.setattr(Project, "_run_step", spy)
    write_slices(tmp_path, make_case((8, 48, 40), defects=("curtains",)).stack)
    write_params(tmp_path, RUN.format(nproc=2, steps=["cropping", "destriping"]))
    Project(tmp_path, quiet=True).run(plots=False)
    assert seen == [("cropping", 1), ("destriping", 1)]
