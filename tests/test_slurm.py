"""Runs on a real single-node Slurm through dask-jobqueue (``-m slurm``; root only).

The session fixture starts munge, slurmctld and slurmd with ``.ci/start_slurm.sh``
(it installs the Debian packages when missing).  Faults are the batch system's
own: ``scancel``, a walltime, a partition that takes no job, signals to the driver.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import DESTRIPING, random_stack, write_params, write_slices
from distributed import get_client
from test_interrupt import check_stopped, done_shards, interrupt_run

from pystack3d_dask.cluster import MMAP_THRESHOLD, cluster_config, scheduler
from pystack3d_dask.demo import write_demo_project
from pystack3d_dask.engine import Project
from pystack3d_dask.errors import WorkersLost
from pystack3d_dask.steps.destriping import destriping
from pystack3d_dask.store import STORE_NAME

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]
pytest.importorskip("dask_jobqueue")

START = Path(__file__).parents[1] / ".ci" / "start_slurm.sh"
#: one small job per worker; "lo": the scheduler and the workers are on this machine
CLUSTER = {"type": "slurm", "interface": "lo", "cores": 1, "memory_limit": "1GiB"}
#: the destriping run of the interrupt tests, on Slurm jobs (more [cluster] keys may follow)
DESTRIPING_SLURM = DESTRIPING + """[cluster]
type = "slurm"
interface = "lo"
memory_limit = "1GiB"
"""


@pytest.fixture(scope="session")
def slurm() -> str:
    """The partition of a running single-node Slurm (started here if needed)."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm tests start a local Slurm, which needs root (.ci/start_slurm.sh)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is not available to install it")
    run = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        pytest.skip(f"could not start Slurm with {START}: {run.stderr.strip()[-500:]}")
    return run.stdout.strip().splitlines()[-1]


@pytest.fixture
def empty_queue(slurm):
    """Fails the test if it leaves jobs in the queue 10 s after its end; cancels them for the next test."""
    yield
    left = _wait_empty_queue(10)
    if left:
        subprocess.run(["scancel", *left], check=False)
    assert not left, f"jobs left in the queue: {left}"


def _jobs(state: str | None = None) -> list[str]:
    cmd = ["squeue", "-h", "-o", "%i"] + (["-t", state] if state else [])
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()


def _wait_empty_queue(seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while _jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    return _jobs()


def _store_contents(project: Path) -> dict:
    """Every array (results, statistics, states) and every step's attributes of a project's store."""
    root = zarr.open_group(project / STORE_NAME, mode="r")
    out = {}
    for path, node in root.members(max_depth=None):
        # the root's attributes name the folder; the input's file records and the hashes that
        # digest them hold the files' paths and times
        out[path] = node[:] if isinstance(node, zarr.Array) else {
            k: v for k, v in node.attrs.items() if k not in ("pystack3d_dask", "hash", "files")}
    return out


def _assert_same_store(project: Path, reference: Path) -> None:
    got, expected = _store_contents(project), _store_contents(reference)
    assert sorted(got) == sorted(expected)
    for path, value in expected.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[path], value, err_msg=path)
        else:
            assert got[path] == value, path


def _destriping_project(folder: Path, nz: int, cluster: str = "") -> Path:
    write_slices(folder, random_stack((nz, 128, 128), "uint8"))
    write_params(folder, DESTRIPING_SLURM + cluster + "\n")
    return folder


def _slices_for(cpu_seconds: float) -> int:
    """Slices of 128² whose destriping needs ``cpu_seconds`` of CPU (measured here, one thread).

    A worker of one thread takes at least that long in wall time, whatever the
    load of the machine: a load only lengthens the run.
    """
    params = tomllib.loads(DESTRIPING)["destriping"]
    stack = random_stack((4, 128, 128), "uint8")
    destriping(stack[:1], **params)[0].compute(scheduler="sync")  # imports and FFT set-up out of the timing
    start = time.process_time()
    destriping(stack[1:], **params)[0].compute(scheduler="sync")
    return math.ceil(cpu_seconds * (len(stack) - 1) / (time.process_time() - start))


def _threads_reference(tmp_path: Path, project: Path, **kwargs) -> Path:
    reference = tmp_path / "reference"
    shutil.copytree(project, reference, ignore=shutil.ignore_patterns(STORE_NAME, "pystack3d_dask_*", ".*lock"))
    Project(reference, quiet=True, cluster="threads", **kwargs).run()
    return reference


def test_whole_chain_on_slurm_is_identical_to_threads(tmp_path, empty_queue):
    slurm, _ = write_demo_project(tmp_path / "slurm", shape=(36, 48, 48))
    reference, _ = write_demo_project(tmp_path / "reference", shape=(36, 48, 48))
    Project(slurm, quiet=True, chunk_slices=5, cluster={**CLUSTER, "n_workers": 2}).run()
    Project(reference, quiet=True, chunk_slices=5, cluster="threads").run()
    _assert_same_store(slurm.parent, reference.parent)
    logs = list((slurm.parent / "pystack3d_dask_report" / "worker_logs").glob("*.err"))
    assert len(logs) >= 2, "the job logs are not in the report folder"


def test_a_cancelled_job_is_replaced(tmp_path, empty_queue, capfd):
    # the replacement comes ~20 s after the cancel (distributed's lost-worker-timeout, a job start):
    # 40 s of CPU leave the last worker busy for longer than that, whatever the load
    nz = _slices_for(40)
    project = _destriping_project(tmp_path / "run", nz, "n_workers = 2")
    cancelled = []

    def cancel_one_job_mid_step():
        while not cancelled:
            running = _jobs("R")
            if len(running) == 2 and done_shards(project, "destriping") >= 1:
                subprocess.run(["scancel", running[0]], check=True)
                cancelled.append(running[0])
            time.sleep(0.2)

    killer = threading.Thread(target=cancel_one_job_mid_step, daemon=True)
    killer.start()
    Project(project, quiet=True, chunk_slices=1, shard_chunks=1).run()
    killer.join(timeout=1)
    assert cancelled, "no job was cancelled: the test proved nothing"
    logs = {p.stem for p in (project / "pystack3d_dask_report" / "worker_logs").glob("*.err")}
    assert len(logs) >= 3, f"the cancelled job was not replaced: job logs {sorted(logs)}"
    assert "Traceback" not in capfd.readouterr().err
    _assert_same_store(project, _threads_reference(tmp_path, project, chunk_slices=1, shard_chunks=1))


def _job_id(log: Path) -> int:
    return int(log.stem.rsplit("-", 1)[1])


@pytest.mark.timeout(2400)  # ~2.5 minutes on an idle machine, 15 under a load of 10
def test_jobs_ended_by_their_walltime_are_replaced(tmp_path, empty_queue):
    # one 1-minute job at a time: its worker retires 38-53 s after it starts (lifetime), or the
    # job is killed at 60 s when the worker started late; the step needs 60 s of CPU, so it
    # outlasts the first job whatever the load (shards of one chunk: a job ending loses little)
    project = _destriping_project(tmp_path / "run", _slices_for(60), 'n_workers = 1\nwalltime = "00:01:00"')
    try:
        Project(project, quiet=True, chunk_slices=4, shard_chunks=1).run()
    except WorkersLost as exc:  # the other legal end: no new job started in no_worker_timeout
        assert re.match(r"all worker jobs ended; \d+ of \d+ shards of destriping written; run again", str(exc))
        Project(project, quiet=True, chunk_slices=4, shard_chunks=1).run()
    logs = sorted((project / "pystack3d_dask_report" / "worker_logs").glob("*.err"), key=_job_id)
    assert len(logs) >= 2, "the run ended within one job's walltime: the test proved nothing"
    first = logs[0].read_text()
    assert "worker-lifetime-reached" in first or "DUE TO TIME LIMIT" in first, first[-2000:]
    _assert_same_store(project, _threads_reference(tmp_path, project, chunk_slices=4, shard_chunks=1))


def test_job_workers_get_the_local_workers_environment(tmp_path, empty_queue):
    # the driver's dask config does not reach a batch job: without the job script's export its
    # nanny sets MALLOC_TRIM_THRESHOLD_=65536 (FFT-heavy steps twice slower)
    with scheduler(cluster_config(CLUSTER), folder=tmp_path):
        client = get_client()
        client.wait_for_workers(1, timeout=600)
        (environ,) = client.run(lambda: dict(os.environ)).values()
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        assert environ.get(name) == str(MMAP_THRESHOLD), name


def test_no_worker_for_too_long_stops_with_one_error_and_resumes(tmp_path, empty_queue, slurm):
    project = _destriping_project(tmp_path / "run", 40, "n_workers = 1\nno_worker_timeout = 10")
    stopped = []

    def end_every_job_when_busy():
        while done_shards(project, "destriping") < 2:
            time.sleep(0.2)
        # new jobs wait in the queue for ever: no worker comes back
        subprocess.run(["scontrol", "update", f"PartitionName={slurm}", "State=DOWN"], check=True)
        subprocess.run(["scancel", *_jobs()], check=True)
        stopped.append(done_shards(project, "destriping"))

    thread = threading.Thread(target=end_every_job_when_busy, daemon=True)
    thread.start()
    try:
        with pytest.raises(WorkersLost, match=r"^all worker jobs ended; \d+ of 40 shards of destriping written; "
                                              r"run again to resume \(no worker for 10 s"):
            Project(project, quiet=True, chunk_slices=1, shard_chunks=1).run()
    finally:
        subprocess.run(["scontrol", "update", f"PartitionName={slurm}", "State=UP"], check=True)
        thread.join(timeout=5)
    assert stopped and done_shards(project, "destriping") >= stopped[0] > 0, "written shards were lost"
    assert not _wait_empty_queue(10), "the pending jobs were not cancelled"
    report = Project(project, quiet=True, chunk_slices=1).run()
    assert report.computed["destriping"] < 40  # the rerun resumed
    _assert_same_store(project, _threads_reference(tmp_path, project, chunk_slices=1, shard_chunks=1))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_signals_to_the_driver_cancel_the_jobs_and_keep_the_shards(tmp_path, empty_queue, sig):
    project = _destriping_project(tmp_path / "run", 40, "n_workers = 2")
    result, done, children = interrupt_run(project, sig, step="destriping", cluster="slurm")
    check_stopped(result, sig, children)
    assert not _wait_empty_queue(10), "worker jobs were left in the queue"
    kept = done_shards(project, "destriping")
    assert 0 < done <= kept, "written shards were deleted"
    resumed = Project(project, quiet=True, chunk_mib=0.001, cluster="threads").run()
    assert resumed.computed["destriping"] == 40 - kept  # exactly the missing shards (one slice each)
    _assert_same_store(project, _threads_reference(tmp_path, project, chunk_mib=0.001, shard_mib=0.008))
