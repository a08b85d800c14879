"""Ctrl-C and SIGTERM during a run: one line, exit 130 / 143, written shards kept, no process left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import DESTRIPING, random_stack, write_params, write_slices

from pystack3d_dask.engine import Project
from pystack3d_dask.store import STORE_NAME

REGISTRATION = """
nproc = 2
process_steps = ["registration_calculation"]
[registration_calculation]
transformation = "AFFINE"
"""
#: a run in a fresh interpreter; ``dask_jobqueue`` imported first replaces SIGINT's handler
RUNNER = "import sys{imports}; from pystack3d_dask.cli import entry; entry()"


def done_shards(project: Path, step: str) -> int:
    """Shards of ``step`` whose statistics (written last, with the done flag) are on disk.

    Counted in the group being written (``<step>~new``) until it is swapped in.
    """
    for group in (f"{step}~new", step):
        folder = project / STORE_NAME / group / "_stats" / "_" / "c"
        if folder.exists():
            return sum(1 for p in folder.rglob("*") if p.is_file())
    return 0


def interrupt_run(project: Path, sig: int, *, step: str, cluster: str = "threads", imports: str = "",
               timeout: float = 240) -> tuple[subprocess.CompletedProcess, int, set[int]]:
    """Run the CLI on ``project``, send ``sig`` once a shard of ``step`` is written (or its pool is up).

    Slices of 64² uint8 make chunks of 1 slice and shards of 2.  Returns the finished
    process, the shards done when the signal was sent and the
    ids of every process the run started.
    """
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-c", RUNNER.format(imports=imports), "-q", "run", str(project), "--no-plots",
           "--cluster", cluster, "--chunk-mib", "0.001",
           "--shard-mib", "0.008"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent, children = psutil.Process(proc.pid), set()
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        with_pool = step == "registration_calculation" and (project / STORE_NAME / f"{step}~new").exists()
        try:
            children |= {c.pid for c in parent.children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        if done_shards(project, step) > 0 or (with_pool and len(children) >= 2):
            break
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{step} wrote no shard in {timeout:g} s: {proc.communicate()}")
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()}"
    done = done_shards(project, step)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), done, children


def _alive(pids: set[int]) -> list[psutil.Process]:
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def check_stopped(result: subprocess.CompletedProcess, sig: int, children: set[int], *, grace: float = 60) -> None:
    """The run ended as interrupted, and the processes it started end within ``grace`` seconds.

    A worker that an ended run leaves behind is an orphan: it is either on its
    way out (slow under load) or never ends, so the test waits for the ends
    and fails after ``grace``.
    """
    assert result.returncode == 128 + sig, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "interrupted; run again to resume", result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    deadline = time.monotonic() + grace
    while (alive := _alive(children)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"processes outlived the run by {grace:g} s: {[p.cmdline() for p in alive]}"


def _project(tmp_path: Path, name: str, stack: np.ndarray, params: str) -> Path:
    write_slices(tmp_path / name, stack)
    write_params(tmp_path / name, params)
    return tmp_path / name


@pytest.mark.parametrize(("sig", "cluster", "imports"), [
    (signal.SIGINT, "threads", ""),
    (signal.SIGTERM, "local", ""),
    (signal.SIGINT, "local", "; import dask_jobqueue"),
], ids=["sigint-threads", "sigterm-local", "sigint-after-dask_jobqueue"])
def test_interrupted_run_keeps_its_shards_and_resumes(tmp_path, sig, cluster, imports):
    stack = random_stack((24, 64, 64), "uint8")
    project = _project(tmp_path, "run", stack, DESTRIPING)
    result, done, children = interrupt_run(project, sig, step="destriping", cluster=cluster, imports=imports)
    check_stopped(result, sig, children)
    kept = done_shards(project, "destriping")
    assert 1 <= done <= kept, "written shards were deleted"
    resumed = Project(project, quiet=True, chunk_mib=0.001).run()  # the store's layout
    # exactly the missing shards (2 slices each), however many the workers wrote after the signal
    assert resumed.computed["destriping"] == len(stack) - 2 * kept
    reference = Project(_project(tmp_path, "reference", stack, DESTRIPING), quiet=True, chunk_mib=0.001)
    reference.run()
    np.testing.assert_array_equal(Project(project).result("destriping").compute(),
                                  reference.result("destriping").compute())


def test_sigterm_stops_the_registration_pool(tmp_path):
    stack = random_stack((40, 128, 128), "uint8")
    project = _project(tmp_path, "run", stack, REGISTRATION)
    result, _, children = interrupt_run(project, signal.SIGTERM, step="registration_calculation")
    assert len(children) >= 2, "the process pool never started: the test proved nothing"
    check_stopped(result, signal.SIGTERM, children)


def test_nproc_above_the_cores_is_capped(tmp_path):
    project = _project(tmp_path, "run", random_stack((2, 16, 16)),
                       DESTRIPING.replace("nproc = 2", "nproc = 100000"))
    with pytest.warns(UserWarning, match=r"nproc = 100000 is more than the \d+ cores of this machine: using \d+"):
        config = Project(project).config
    assert config.nproc == len(os.sched_getaffinity(0))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_swallowed_where_it_landed_still_stops_the_run():
    """Python only prints an exception raised in a weakref callback or a __del__ (and a library
    may catch it): the run then goes on, but must still end as interrupted."""
    import weakref

    from pystack3d_dask.errors import Interrupted
    from pystack3d_dask.signals import interruptible

    class Thing:
        pass

    thing = Thing()
    with pytest.raises(Interrupted) as caught:
        with interruptible():
            # the callback runs while the object is freed; the handler raises in it
            keep = weakref.ref(thing, lambda _: os.kill(os.getpid(), signal.SIGTERM))
            del thing
            assert keep() is None  # the block ran to its end: the exception did not reach it
    assert caught.value.exit_code == 143
