"""A run killed with SIGKILL at any moment restarts on the missing shards only, byte-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr
from conftest import random_stack, write_params, write_slices

from pystack3d_dask.engine import Project

PARAMS = """
process_steps = ["cropping", "cropping_final"]
[cropping]
area = [1, 99999, 0, 99999]
[cropping_final]
area = [0, 30, 2, 40]
"""

#: chunks of 1 slice in shards of 3 (20 shards of 60 slices), or unsharded (one file per slice)
LAYOUTS = {"sharded": {"shard_chunks": 3}, "unsharded": {"shard_mib": 0}}

# The child runs the project with every shard write slowed down, so the parent can kill it
# while shards are being written; the engine itself is untouched.
CHILD = textwrap.dedent("""
    import sys, time
    import pystack3d_dask.engine as engine
    from pystack3d_dask.store import write_block

    def slow_write(*args):
        time.sleep(0.05)
        return write_block(*args)

    engine.write_block = slow_write
    engine.Project(sys.argv[1], chunk_slices=1, quiet=True, **{layout!r}).run()
""")


def _done_flags(folder, step):
    """Chunks written of ``step``: in the group being written (``~new``) until it is swapped in."""
    for group in (f"{step}~new", step):
        try:
            stats = zarr.open_array(folder / "pystack3d_dask.zarr", path=f"{group}/_stats/_", mode="r")[:]
        except Exception:
            continue
        return int(np.sum(stats[:, -1] == 1))
    return 0


def _kill_when(folder, step, at_least, proc):
    deadline = time.monotonic() + 120
    while _done_flags(folder, step) < at_least:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("layout", ["sharded", pytest.param("unsharded", marks=pytest.mark.slow)])
def test_sigkill_then_resume_is_byte_identical(tmp_path, layout):
    stack = random_stack((60, 48, 40))
    for name in ("killed", "clean"):
        write_slices(tmp_path / name, stack)
        write_params(tmp_path / name, PARAMS)
    folder = tmp_path / "killed"
    script = tmp_path / "child.py"
    script.write_text(CHILD.replace("{layout!r}", repr(LAYOUTS[layout])))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    # kill once during ingest, once during the first step
    for step in ("input", "cropping"):
        proc = subprocess.Popen([sys.executable, str(script), str(folder)], env=env)
        _kill_when(folder, step, 20 if step == "input" else 10, proc)
        done = _done_flags(folder, step)
        assert 0 < done < 60, f"killed at {done} slices of {step}: not mid-step"
        assert done % (3 if layout == "sharded" else 1) == 0  # whole shards
    report = Project(folder, chunk_slices=1, quiet=True).run()  # the store's layout
    assert report.computed["cropping"] == 60 - done  # only the shards the killed run had not written
    assert report.computed["cropping_final"] == 60
    Project(tmp_path / "clean", chunk_slices=1, quiet=True, **LAYOUTS[layout]).run()

    def files(root):
        store = root / "pystack3d_dask.zarr"
        return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*")
                if p.is_file() and p.name != "zarr.json"}

    killed, clean = files(folder), files(tmp_path / "clean")
    assert killed.keys() == clean.keys()
    assert all(killed[k] == clean[k] for k in clean)  # every chunk byte-identical
    np.testing.assert_array_equal(Project(folder).result("cropping_final").compute(), stack[:, 8:46, 1:31])
